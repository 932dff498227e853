"""The shipped default weights: a small file, a complete record, hash-checked loading, sensible output."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

WEIGHTS = Path(str(resources.files("drcr_model") / "weights"))

pytestmark = pytest.mark.skipif(not (WEIGHTS / "default.json").exists(), reason="no default weights shipped")


def test_record_is_complete_and_matches_the_file() -> None:
    record = json.loads((WEIGHTS / "default.json").read_text())
    pt = WEIGHTS / record["file"]
    assert pt.stat().st_size < 5_000_000
    assert hashlib.sha256(pt.read_bytes()).hexdigest() == record["sha256"]
    assert record["preprocessing"] == "divide_by_image_max"
    assert record["bands_nm"] == list(range(400, 701, 10))
    assert set(record["config"]) == {"in_channels", "out_channels", "channels", "n_blocks"}
    assert "synthetic" in record["meta"]["trained_on"] and "data_seed" in record["meta"]
    for inp in ("clean", "degraded"):
        assert {"drcr", "rootpoly2_ls", "rootpoly2_relative"} <= set(record["metrics"][f"synthetic_heldout_{inp}"])


def test_default_weights_load_and_reconstruct_a_synthetic_scene() -> None:
    from drcr_model import default_weights, reconstruct
    from drcr_model.camera import simulate_rgb
    from drcr_model.metrics import mrae
    from drcr_model.scenes import SceneConfig, make_scene

    torch.set_num_threads(1)
    w = default_weights()
    assert not w.meta.get("untrained")
    model = w.load(device="cpu")  # checks the sha256
    cube = make_scene(424242, SceneConfig(height=64, width=64))
    with torch.inference_mode():
        rec = reconstruct(simulate_rgb(cube), model)
    assert rec.shape == (64, 64, 31) and np.isfinite(rec).all()
    # Held-out MRAE of the shipped weights is ~0.3-0.4 (default.json); an untrained net is far worse.
    assert mrae(cube, rec) < 0.8


def _train_default_weights():  # type: ignore[no-untyped-def]
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_default_weights.py"
    spec = importlib.util.spec_from_file_location("train_default_weights", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_weights_table_is_the_record_s() -> None:
    record = json.loads((WEIGHTS / "default.json").read_text())
    table = _train_default_weights().readme_table(record)
    label = "| DRCR {channels}/{n_blocks} (default.pt) | clean | ".format(**record["config"])
    assert label in table and len(table.splitlines()) == 8
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert table in readme, "regenerate with: python benchmarks/train_default_weights.py --stage table"


def test_record_recipe_is_the_shipped_job() -> None:
    """``benchmarks/train_default_weights.py`` reproduces the record: the same final job and the same chain
    of jobs before it, each trained to its configured iterations."""
    from drcr_model.train import TrainConfig

    mod = _train_default_weights()
    meta = json.loads((WEIGHTS / "default.json").read_text())["meta"]
    config_path = meta["reproduce"].split("--config ")[1].split()[0]
    assert mod.REPO / config_path == mod.SHIPPED_JOB  # the script's default --config reproduces the record
    final = TrainConfig.from_toml(mod.REPO / config_path)
    assert TrainConfig.from_dict(meta["training_recipe"]) == dataclasses.replace(final, iterations=meta["iterations"])
    assert final.total_iterations == meta["iterations"]  # the plain command trains exactly that far
    chain = mod.init_chain(final)
    assert [TrainConfig.from_dict(r) for r in meta["init_recipes"]] == chain
    assert chain[0] == TrainConfig.from_toml(mod.REPO / "jobs" / "default_weights.toml")
    assert meta["iterations_total"] == sum(j.total_iterations for j in chain) + meta["iterations"]
    finetune = TrainConfig.from_toml(mod.REPO / "jobs" / "default_weights_finetune.toml")
    assert mod.init_chain(finetune) == [chain[0]]


def test_candidate_jobs_chain_to_the_shipped_job() -> None:
    """Every ``jobs/default_weights_*.toml`` descends from ``jobs/default_weights.toml`` (stage ``init``)."""
    from drcr_model.train import TrainConfig

    mod = _train_default_weights()
    final = TrainConfig.from_toml(mod.REPO / "jobs" / "default_weights.toml")
    for job in sorted((mod.REPO / "jobs").glob("default_weights_*.toml")):
        assert mod.init_chain(TrainConfig.from_toml(job))[0] == final, job


def test_curve_stage_scores_the_start_every_checkpoint_and_last(tmp_path, monkeypatch) -> None:
    from drcr_model.evaluate import heldout_synthetic
    from drcr_model.metrics import mrae
    from drcr_model.net import DRCRNet
    from drcr_model.train import DataConfig, ModelConfig, TrainConfig, Trainer, make_dataset

    torch.set_num_threads(1)
    mod = _train_default_weights()
    monkeypatch.setattr(mod, "HELDOUT", {"seed": 1000, "n_scenes": 2, "scene_size": 32})
    monkeypatch.setattr(mod, "VALIDATION", {"seed": 2000, "n_scenes": 2, "scene_size": 32})
    base = TrainConfig(
        model=ModelConfig(channels=8, n_blocks=1),
        data=DataConfig(n_scenes=2, scene_size=16, patch_size=8, stride=8),
        lr=1e-2,
        max_iter=10,
        iterations=2,
        batch_size=4,
        out_dir=str(tmp_path / "init"),
    )
    Trainer(base, make_dataset(base)).save(tmp_path / "init" / "last.pth")
    job = dataclasses.replace(  # a deepening job: its start is scored with the start's own configuration
        base,
        model=ModelConfig(channels=8, n_blocks=2),
        init_weights=str(tmp_path / "init" / "last.pth"),
        deepen=True,
        iterations=5,
        checkpoint_every=2,
        log_every=1,
        out_dir=str(tmp_path / "job"),
    )
    mod.stage_train(job, 0.0)
    rows = mod.curve_table(job, every=4).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 0", "| 4", "| 5"]  # start, every 4th, last
    last = torch.load(tmp_path / "job" / "last.pth", weights_only=True)
    net = DRCRNet(3, 31, 8, 2)
    net.load_state_dict(last["state_dict"])
    net.eval()
    clean = heldout_synthetic(seed=1000, n_scenes=2, scene_size=32)["clean"]
    from drcr_model.inference import reconstruct

    with torch.inference_mode():
        expected = np.mean([mrae(p.cube, reconstruct(p.rgb, net)) for p in clean])
    assert rows[-1].split(" | ")[2] == f"{expected:.3f}"
    validation = heldout_synthetic(seed=2000, n_scenes=2, scene_size=32)["clean"]
    with torch.inference_mode():
        expected = np.mean([mrae(p.cube, reconstruct(p.rgb, net)) for p in validation])
    assert rows[-1].split(" | ")[6] == f"{expected:.3f}"  # the validation columns follow the held-out ones
    assert rows[0].split(" | ")[2] != rows[-1].split(" | ")[2]  # training moved the weights


def test_the_evaluation_job_scores_the_record_s_heldout_scenes() -> None:
    """``jobs/evaluate_synthetic.toml`` (the README's reproduce command) scores the scenes the record reports."""
    import tomllib

    mod = _train_default_weights()
    job = tomllib.loads((mod.REPO / "jobs" / "evaluate_synthetic.toml").read_text())
    assert {k: job["data"][k] for k in mod.HELDOUT} == mod.HELDOUT
    assert json.loads((WEIGHTS / "default.json").read_text())["meta"]["heldout"] == mod.HELDOUT
    assert mod.HELDOUT["seed"] != mod.VALIDATION["seed"]  # runs are chosen on other scenes than reported
