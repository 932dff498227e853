"""The shipped default weights: a small file, a complete record, hash-checked loading, sensible output."""

from __future__ import annotations

import hashlib
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
