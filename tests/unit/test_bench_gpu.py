"""The prepared GPU benchmark runs (CPU smoke mode here; the CUDA rows are for GPU runs, marked ``gpu``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_mode_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    assert _load().main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| fp32 |")]
    assert len(rows) == 4  # fp32 × channels_last on/off × batch 1, 2
    assert all(float(r.split("|")[-2]) < 1e-4 for r in rows)  # same output as fp32 eager
    if not torch.cuda.is_available():
        assert "Not run (no CUDA here): 60 rows" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matrix_runs(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    assert _load().main(["--config", "tiny", "--size", "64", "--batches", "1", "--runs", "2", "--out", str(out)]) == 0
    assert len([line for line in out.read_text().splitlines() if line.startswith("| ")]) == 2 + 32
