"""Checkpoint loading in every form users have it (spec §7), and refusal of everything else."""

from __future__ import annotations

import hashlib
import io
import pickle
from collections import OrderedDict
from pathlib import Path

import fsspec
import pytest
import torch

from drcr_model.checkpoint import (
    UNUSED_KEYS,
    CheckpointError,
    extract_state_dict,
    infer_config,
    load_model,
    load_state_dict,
    read_checkpoint,
)
from drcr_model.net import DRCRNet

TINY = {"in_channels": 3, "out_channels": 31, "channels": 8, "n_blocks": 2}


@pytest.fixture(scope="module")
def source_model() -> DRCRNet:
    torch.manual_seed(7)
    return DRCRNet(**TINY).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def assert_same_model(model: DRCRNet, source: DRCRNet, x: torch.Tensor) -> None:
    for (k, a), (k2, b) in zip(model.state_dict().items(), source.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


# --- accepted forms ---------------------------------------------------------------------------------


def test_bare_state_dict(tmp_path: Path, source_model: DRCRNet, x: torch.Tensor) -> None:
    path = save(source_model.state_dict(), tmp_path / "bare.pth")
    model = load_model(str(path))
    assert model.load_method == "names"
    assert not model.training
    assert model.config == TINY
    assert_same_model(model, source_model, x)


def test_training_dict_with_optimizer(tmp_path: Path, source_model: DRCRNet, x: torch.Tensor) -> None:
    """The authors' main.py format: {epoch, iter, state_dict, optimizer (Adam state_dict)}."""
    trained = DRCRNet(**TINY)
    trained.load_state_dict(source_model.state_dict())
    opt = torch.optim.Adam(trained.parameters(), lr=1e-4, betas=(0.9, 0.999))
    trained(x).abs().mean().backward()
    opt.step()
    ckpt = {"epoch": 12, "iter": 28344, "state_dict": trained.state_dict(), "optimizer": opt.state_dict()}
    model = load_model(str(save(ckpt, tmp_path / "net_12epoch.pth")))
    assert_same_model(model, trained.eval(), x)


def test_module_prefix_is_removed(tmp_path: Path, source_model: DRCRNet, x: torch.Tensor) -> None:
    sd = OrderedDict((f"module.{k}", v) for k, v in source_model.state_dict().items())
    model = load_model(str(save({"state_dict": sd, "epoch": 1}, tmp_path / "dp.pth")))
    assert model.load_method == "names"
    assert_same_model(model, source_model, x)


def test_renamed_keys_load_by_position(tmp_path: Path, source_model: DRCRNet, x: torch.Tensor) -> None:
    sd = OrderedDict((f"layers.{i}.param", v) for i, v in enumerate(source_model.state_dict().values()))
    model = load_model(str(save(sd, tmp_path / "renamed.pth")))
    assert model.load_method == "positions"
    assert_same_model(model, source_model, x)


def test_older_202_variant_by_name(tmp_path: Path, source_model: DRCRNet, x: torch.Tensor) -> None:
    sd = OrderedDict((k, v) for k, v in source_model.state_dict().items() if k not in UNUSED_KEYS)
    assert len(sd) == len(source_model.state_dict()) - 4
    model = load_model(str(save(sd, tmp_path / "older.pth")))
    assert model.load_method == "names-202"
    with torch.no_grad():  # the missing tensors are never used, so the output is the same
        assert torch.equal(model(x), source_model(x))


def test_older_202_variant_by_position(tmp_path: Path, source_model: DRCRNet, x: torch.Tensor) -> None:
    kept = [v for k, v in source_model.state_dict().items() if k not in UNUSED_KEYS]
    sd = OrderedDict((f"p{i}", v) for i, v in enumerate(kept))
    model = load_model(str(save(sd, tmp_path / "older_renamed.pth")))
    assert model.load_method == "positions"
    with torch.no_grad():
        assert torch.equal(model(x), source_model(x))


def test_fsspec_memory_url(source_model: DRCRNet, x: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save(source_model.state_dict(), buf)
    fs = fsspec.filesystem("memory")
    url = "memory://drcr-test/ckpt.pth"
    fs.pipe(url, buf.getvalue())
    try:
        model = load_model(url, sha256=hashlib.sha256(buf.getvalue()).hexdigest())
        assert_same_model(model, source_model, x)
    finally:
        fs.rm("memory://drcr-test", recursive=True)


def test_sha256_match(tmp_path: Path, source_model: DRCRNet) -> None:
    path = save(source_model.state_dict(), tmp_path / "w.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_model(str(path), sha256=digest.upper())
    assert model.weights_sha256 == digest
    _, got = read_checkpoint(str(path))
    assert got == digest


def test_sha256_mismatch_refuses(tmp_path: Path, source_model: DRCRNet) -> None:
    path = save(source_model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="sha256.*refusing"):
        load_model(str(path), sha256="0" * 64)


# --- config inference -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"in_channels": 3, "out_channels": 31, "channels": 100, "n_blocks": 10},
        {"in_channels": 3, "out_channels": 31, "channels": 200, "n_blocks": 8},
        {"in_channels": 4, "out_channels": 16, "channels": 24, "n_blocks": 1},
    ],
)
def test_infer_config_from_shapes(config: dict[str, int]) -> None:
    with torch.device("meta"):
        sd = DRCRNet(**config).state_dict()
    assert infer_config(sd) == config
    older = OrderedDict((k, v) for k, v in sd.items() if k not in UNUSED_KEYS)
    assert infer_config(older) == config
    renamed = OrderedDict((str(i), v) for i, v in enumerate(sd.values()))
    assert infer_config(renamed) == config


def test_explicit_config_that_disagrees_is_refused(tmp_path: Path, source_model: DRCRNet) -> None:
    path = save(source_model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"input_conv2D\.conv2d\.weight"):
        load_model(str(path), config=TINY | {"channels": 16})


# --- refused forms ----------------------------------------------------------------------------------


def test_random_bytes_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).numpy().tobytes()
    )
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_model(str(path))


def test_truncated_file_refused(tmp_path: Path, source_model: DRCRNet) -> None:
    full = save(source_model.state_dict(), tmp_path / "full.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_model(str(path))


def test_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(str(tmp_path / "nope.pth"))


def test_wrong_shape_names_first_differing_key(source_model: DRCRNet) -> None:
    sd = source_model.state_dict()
    sd["backbone.1.conv3.conv2d.bias"] = torch.zeros(9)
    sd["output_conv2D.conv2d.weight"] = torch.zeros(30, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"backbone\.1\.conv3\.conv2d\.bias.*\[8\].*\[9\]"):
        load_state_dict(DRCRNet(**TINY), sd)


def test_wrong_shape_with_renamed_keys_names_first_differing_key(source_model: DRCRNet) -> None:
    values = list(source_model.state_dict().values())
    values[5] = torch.zeros(3)
    sd = OrderedDict((f"p{i}", v) for i, v in enumerate(values))
    with pytest.raises(CheckpointError, match=r"denosing\.conv0_11\.weight"):
        load_state_dict(DRCRNet(**TINY), sd)


def test_wrong_tensor_count(tmp_path: Path, source_model: DRCRNet) -> None:
    sd = source_model.state_dict()
    del sd["backbone.0.se1.fc.2.weight"]
    with pytest.raises(CheckpointError, match="tensors"):
        load_state_dict(DRCRNet(**TINY), sd)
    with pytest.raises(CheckpointError, match="tensors"):  # and through the file path: inference fails too
        load_model(str(save(sd, tmp_path / "short.pth")))


def test_extra_tensor_refused(source_model: DRCRNet) -> None:
    sd = source_model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError):
        load_state_dict(DRCRNet(**TINY), sd)


def test_non_tensor_entries_refused() -> None:
    with pytest.raises(CheckpointError, match="not a tensor"):
        extract_state_dict({"a.weight": torch.zeros(1), "epoch": 3})
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        extract_state_dict([torch.zeros(1)])
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        extract_state_dict({})


class SideEffect:
    """Unpickling this object opens (creates) the marker file: the classic pickle code-execution hook."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


class Payload:
    """A plain custom class: not allowed by the weights-only unpickler either."""

    def __init__(self) -> None:
        self.value = 1


def test_pickle_with_side_effect_refused_and_not_run(tmp_path: Path, source_model: DRCRNet) -> None:
    marker = tmp_path / "pwned"
    path = save({"state_dict": source_model.state_dict(), "hook": SideEffect(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(str(path))
    assert not marker.exists()


def test_plain_pickle_with_side_effect_refused(tmp_path: Path) -> None:
    """Not even a torch zip file: a raw pickle stream (legacy format) with the same hook."""
    marker = tmp_path / "pwned2"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(SideEffect(marker)))
    with pytest.raises(CheckpointError):
        load_model(str(path))
    assert not marker.exists()


def test_custom_class_object_refused(tmp_path: Path, source_model: DRCRNet) -> None:
    path = save({"state_dict": source_model.state_dict(), "meta": Payload()}, tmp_path / "custom.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(str(path))


def test_sha256_checked_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned3"
    path = save(SideEffect(marker), tmp_path / "evil2.pth")
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(str(path), sha256="f" * 64)
    assert not marker.exists()


def test_side_effect_hook_is_real(tmp_path: Path) -> None:
    """Control for the tests above: an unsafe load really would run the hook (it only creates a file)."""
    marker = tmp_path / "control"
    path = save(SideEffect(marker), tmp_path / "evil3.pth")
    torch.load(path, weights_only=False).close()
    assert marker.exists()
