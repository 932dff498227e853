"""The Weights record: validation, round trip, loading, and the seeded untrained demo weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from drcr_model import weights as weights_mod
from drcr_model.checkpoint import CheckpointError
from drcr_model.net import DRCRNet
from drcr_model.weights import (
    BANDS_NM,
    NTIRE2022_CONFIG,
    UNTRAINED_CONFIG,
    Weights,
    authors_ntire2022,
    default_weights,
    untrained_demo_weights,
)


def sample_weights(**overrides: object) -> Weights:
    fields: dict[str, object] = {
        "name": "drcr-synthetic-v1",
        "url": "s3://bucket/weights/drcr.pt",
        "sha256": "ab" * 32,
        "config": {"in_channels": 3, "out_channels": 31, "channels": 16, "n_blocks": 1},
        "metrics": {"synthetic_heldout": {"mrae": 0.12, "rmse": 0.03}},
        "meta": {"recipe": "train.py --epochs 3", "seed": 1},
    }
    return Weights(**(fields | overrides))  # type: ignore[arg-type]


def test_bands() -> None:
    assert tuple(range(400, 701, 10)) == BANDS_NM and len(BANDS_NM) == 31


def test_record_round_trip_through_json() -> None:
    w = sample_weights()
    record = w.to_record()
    assert record["config"] == dict(w.config) and record["bands_nm"] == list(BANDS_NM)
    again = Weights.from_record(json.loads(json.dumps(record)))
    assert again == w
    assert again.to_record() == record


def test_from_record_overrides() -> None:
    w = Weights.from_record(sample_weights().to_record(), url="/local/drcr.pt")
    assert w.url == "/local/drcr.pt" and w.name == "drcr-synthetic-v1"


def test_record_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample_weights().url = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"preprocessing": "divide_by_255"}, "preprocessing"),
        ({"bands_nm": (400, 410)}, "bands_nm"),
        ({"config": {"in_channels": 3, "out_channels": 16, "channels": 16, "n_blocks": 1}}, "bands_nm"),
        ({"config": {"channels": 16, "blocks": 1}}, "config"),
        ({"config": {"channels": 0}}, "config"),
        ({"config": {"channels": "16"}}, "config"),
        ({"sha256": "not-a-hash"}, "sha256"),
        ({"name": ""}, "name"),
    ],
)
def test_validation_errors_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"Weights\.{field}"):
        sample_weights(**overrides)


def test_from_record_rejects_unknown_fields() -> None:
    record = sample_weights().to_record() | {"checksum": "x"}
    with pytest.raises(ValueError, match="checksum"):
        Weights.from_record(record)


def test_load_without_location() -> None:
    with pytest.raises(ValueError, match="no location"):
        sample_weights(url=None).load()


def test_untrained_demo_weights_deterministic(tmp_path: Path) -> None:
    a = untrained_demo_weights(tmp_path / "a")
    b = untrained_demo_weights(tmp_path / "b")
    assert a.sha256 == b.sha256
    assert a.url != b.url
    assert hashlib.sha256(Path(b.url).read_bytes()).hexdigest() == b.sha256  # type: ignore[arg-type]
    assert a.meta["untrained"] is True and dict(a.config) == dict(UNTRAINED_CONFIG)
    again = untrained_demo_weights(tmp_path / "a")  # cached file reused
    assert again == a


def test_untrained_demo_weights_do_not_touch_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    untrained_demo_weights(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_untrained_demo_weights_load(tmp_path: Path) -> None:
    w = untrained_demo_weights(tmp_path)
    model = w.load(device="cpu")
    assert isinstance(model, DRCRNet) and model.config == dict(UNTRAINED_CONFIG)
    assert model.weights_sha256 == w.sha256 and not model.training
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 31, 8, 8)


def test_load_checks_hash(tmp_path: Path) -> None:
    w = untrained_demo_weights(tmp_path)
    with pytest.raises(CheckpointError, match="sha256"):
        dataclasses.replace(w, sha256="0" * 64).load()


def test_load_refuses_config_that_disagrees_with_file(tmp_path: Path) -> None:
    w = untrained_demo_weights(tmp_path)
    with pytest.raises(CheckpointError):
        dataclasses.replace(w, config=dict(UNTRAINED_CONFIG) | {"channels": 24}).load()


def test_authors_ntire2022_record_loads_a_training_dict(tmp_path: Path) -> None:
    """Stand-in for the released model.pth: full config, {epoch, iter, state_dict} as main.py writes it."""
    torch.manual_seed(0)
    source = DRCRNet(**NTIRE2022_CONFIG)
    path = tmp_path / "model.pth"
    torch.save({"epoch": 100, "iter": 236200, "state_dict": source.state_dict()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    w = authors_ntire2022(str(path), sha256=digest)
    assert dict(w.config) == dict(NTIRE2022_CONFIG) and w.preprocessing == "divide_by_image_max"
    model = w.load(device="cpu")
    assert model.config == dict(NTIRE2022_CONFIG)
    assert torch.equal(model.output_conv2D.conv2d.weight, source.output_conv2D.conv2d.weight)


def test_default_weights_without_shipped_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_mod, "_package_weights_dir", lambda: tmp_path / "pkg")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    w = default_weights()
    assert w.meta["untrained"] is True
    assert Path(w.url).is_relative_to(tmp_path / "home")  # type: ignore[arg-type]


def test_default_weights_from_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    record = sample_weights(url=None, sha256=None).to_record()
    record.pop("url")
    record["file"] = "drcr-synthetic.pt"
    (pkg / "default.json").write_text(json.dumps(record))
    monkeypatch.setattr(weights_mod, "_package_weights_dir", lambda: pkg)
    w = default_weights()
    assert w.url == str(pkg / "drcr-synthetic.pt") and w.name == "drcr-synthetic-v1"
    assert dict(w.config) == dict(record["config"])
