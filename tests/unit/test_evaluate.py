"""Evaluation: per-image rows, means, Parquet output, job files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from drcr_model.datasets import Pair
from drcr_model.evaluate import EvalConfig, evaluate_pairs, format_table, heldout_synthetic, summarize, write_parquet

REPO = Path(__file__).resolve().parents[2]


def _pairs() -> list[Pair]:
    rng = np.random.default_rng(0)
    return [
        Pair(
            f"p{i}",
            rng.integers(0, 255, (8, 8, 3)).astype(np.uint8),
            rng.uniform(0.1, 0.9, (8, 8, 31)).astype(np.float32),
        )
        for i in range(2)
    ]


def test_perfect_and_scaled_predictors(tmp_path) -> None:
    pairs = _pairs()
    truth = {p.name: p.cube for p in pairs}
    perfect = evaluate_pairs(
        lambda rgb: next(c for c in truth.values() if c.shape[:2] == rgb.shape[:2]), pairs[:1], method="oracle"
    )
    assert perfect[0]["mrae"] == 0.0 and perfect[0]["rmse"] == 0.0 and perfect[0]["backprojection_mrae"] == 0.0
    it = iter(pairs)
    scaled = evaluate_pairs(lambda rgb: next(it).cube * 1.1, pairs, method="x1.1", input_name="clean")
    assert all(r["mrae"] == pytest.approx(0.1, rel=1e-5) for r in scaled)
    assert all(r["sam_rad"] == pytest.approx(0.0, abs=1e-3) for r in scaled)
    means = summarize(perfect + scaled)
    assert means[("x1.1", "clean")]["images"] == 2
    assert "| x1.1 | clean | 2 |" in format_table(perfect + scaled)
    write_parquet(scaled, tmp_path / "m.parquet")
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.num_rows == 2 and {"image", "method", "input", "mrae", "psnr"} <= set(table.column_names)


def test_heldout_synthetic_has_clean_and_degraded_inputs_of_the_same_scenes() -> None:
    sets = heldout_synthetic(seed=5, n_scenes=2, scene_size=16)
    assert [p.name for p in sets["clean"]] == [p.name for p in sets["degraded"]]
    np.testing.assert_array_equal(sets["clean"][0].cube, sets["degraded"][0].cube)
    assert not np.array_equal(sets["clean"][0].rgb, sets["degraded"][0].rgb)


def test_evaluation_job_file_parses() -> None:
    cfg = EvalConfig.from_toml(REPO / "jobs" / "evaluate_synthetic.toml")
    assert cfg.weights == "default" and cfg.data.seed == 1000 and cfg.baseline_data.n_scenes == 384


def test_run_scores_a_training_checkpoint_and_baselines(tmp_path) -> None:
    import torch

    from drcr_model.evaluate import run
    from drcr_model.train import DataConfig, ModelConfig, TrainConfig, Trainer, make_dataset

    torch.set_num_threads(1)
    data = DataConfig(n_scenes=2, scene_size=16, patch_size=8, stride=8)
    cfg = TrainConfig(model=ModelConfig(channels=8, n_blocks=1), data=data, batch_size=2, out_dir=str(tmp_path))
    trainer = Trainer(cfg, make_dataset(cfg))
    trainer.run(1)
    trainer.save(tmp_path / "c.pth")
    job = EvalConfig(
        weights=str(tmp_path / "c.pth"),
        data=DataConfig(seed=9, n_scenes=1, scene_size=18, patch_size=8),  # 18: exercises the authors' two passes
        baseline_data=data,
        output=str(tmp_path / "m.parquet"),
    )
    rows, table = run(job)
    assert {(r["method"], r["input"]) for r in rows} == {
        (m, i) for m in ("drcr", "rootpoly2_ls", "rootpoly2_relative") for i in ("clean", "degraded")
    }
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 6
    assert "rootpoly2_relative" in table
