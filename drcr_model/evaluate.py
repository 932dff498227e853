"""Evaluation with the NTIRE 2022 metrics, per image and as a mean, written as Parquet and a table.

Per image: MRAE, MRAE restricted to gt ≥ 0.01 (calibration.md pitfall), RMSE, PSNR (peak 1, our own
definition, spec §8), SAM (radians and degrees), back-projection MRAE through the challenge camera.
Reconstructions are clipped to [0, 1] before scoring as the authors' evaluation did (``clip``); the
challenge's central crop ``[128:-128, 128:-128]`` is an option (``crop``); the authors scored whole images.

CLI: ``python -m drcr_model.evaluate --config jobs/evaluate_synthetic.toml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drcr_model.baseline import RootPolynomial, fit_root_polynomial
from drcr_model.camera import DEFAULT_BANDS, ntire2022_camera_response, simulate_rgb
from drcr_model.datasets import Pair
from drcr_model.metrics import all_metrics

__all__ = [
    "EvalConfig",
    "evaluate_pairs",
    "summarize",
    "format_table",
    "write_parquet",
    "heldout_synthetic",
    "drcr_predictor",
    "evaluate_default_weights",
    "run",
    "main",
]

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]
"""H×W×3 uint8 RGB → H×W×bands float32 cube."""

TABLE_COLUMNS = ("mrae", "mrae_gt_ge_0.01", "rmse", "psnr", "sam_deg", "backprojection_mrae")


def drcr_predictor(model: torch.nn.Module, mode: str = "authors") -> Predictor:
    """Wrap a DRCRNet as a predictor (whole image, the authors' overlapping passes when H, W ≢ 0 mod 4)."""
    from drcr_model.inference import reconstruct

    model.eval()

    def predict(rgb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return reconstruct(rgb, model, mode=mode)  # type: ignore[arg-type]

    return predict


def evaluate_pairs(
    predict: Predictor,
    pairs: Sequence[Pair],
    *,
    method: str,
    input_name: str = "",
    clip: bool = True,
    crop: bool = False,
    bands: np.ndarray = DEFAULT_BANDS,
) -> list[dict[str, Any]]:
    """One row per image: ``image``, ``method``, ``input`` and every metric of :func:`all_metrics`."""
    response = ntire2022_camera_response(bands)
    rows = []
    for p in pairs:
        rec = predict(p.rgb)
        row: dict[str, Any] = {"image": p.name, "method": method, "input": input_name, "clip": clip, "crop": crop}
        row |= all_metrics(p.cube, rec, response, clip=clip, crop=crop)
        rows.append(row)
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Arithmetic mean of every metric over images, per (method, input), as the challenge reported."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["input"]), []).append(r)
    return {
        key: {c: float(np.mean([r[c] for r in rs])) for c in rs[0] if isinstance(rs[0][c], float)} | {"images": len(rs)}
        for key, rs in groups.items()
    }


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A markdown table of the per-(method, input) means."""
    means = summarize(rows)
    head = "| method | input | images | " + " | ".join(columns) + " |"
    sep = "|" + " --- |" * (3 + len(columns))
    lines = [head, sep]
    for (method, inp), m in means.items():
        vals = " | ".join(f"{m[c]:.4g}" if c in m else "" for c in columns)
        lines.append(f"| {method} | {inp} | {m['images']} | {vals} |")
    return "\n".join(lines)


def write_parquet(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write the per-image rows as a Parquet table (one row per image and method/input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), path)


def heldout_synthetic(
    *, seed: int, n_scenes: int, scene_size: int, npe: float = 750.0, jpeg_quality: int = 65
) -> dict[str, list[Pair]]:
    """Held-out synthetic scenes with two inputs each: ``clean`` (no noise, lossless) and ``degraded``
    (shot noise at ``npe`` + JPEG at ``jpeg_quality``, the challenge's published sample values)."""
    from drcr_model.scenes import SceneConfig, make_scene, scene_seed

    cfg = SceneConfig(height=scene_size, width=scene_size)
    out: dict[str, list[Pair]] = {"clean": [], "degraded": []}
    for i in range(n_scenes):
        s = scene_seed(seed, i)
        cube = make_scene(s, cfg)
        name = f"heldout_{seed}_{i:04d}"
        out["clean"].append(Pair(name, simulate_rgb(cube), cube))
        out["degraded"].append(Pair(name, simulate_rgb(cube, npe=npe, jpeg_quality=jpeg_quality, seed=s), cube))
    return out


def _baselines(train_pairs: Sequence[Pair]) -> dict[str, RootPolynomial]:
    rgbs, cubes = [p.rgb for p in train_pairs], [p.cube for p in train_pairs]
    return {
        "rootpoly2_ls": fit_root_polynomial(rgbs, cubes, weighting="none"),
        "rootpoly2_relative": fit_root_polynomial(rgbs, cubes, weighting="relative"),
    }


def _evaluate_all(
    predictors: Mapping[str, Predictor], inputs: Mapping[str, Sequence[Pair]], *, clip: bool, crop: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for input_name, pairs in inputs.items():
        for method, predict in predictors.items():
            rows += evaluate_pairs(predict, pairs, method=method, input_name=input_name, clip=clip, crop=crop)
    return rows


def evaluate_default_weights(
    weights_path: str | Path, train_config: Any, *, out_dir: str | Path, seed: int, n_scenes: int, scene_size: int
) -> tuple[dict[str, Any], str]:
    """Metrics of trained weights and the root-polynomial baselines (fitted on the same training scenes)
    on held-out synthetic scenes, clean and degraded; returns (``Weights.metrics`` dict, printed table)
    and writes ``{out_dir}/heldout_metrics.parquet``."""
    from drcr_model.train import DataConfig

    job = EvalConfig(
        weights=str(weights_path),
        data=DataConfig(seed=seed, n_scenes=n_scenes, scene_size=scene_size),
        baseline_data=train_config.data,
        output=str(Path(out_dir) / "heldout_metrics.parquet"),
    )
    rows, table = run(job)
    metrics: dict[str, Any] = {}
    for (method, inp), m in summarize(rows).items():
        metrics.setdefault(f"synthetic_heldout_{inp}", {})[method] = {k: round(v, 5) for k, v in m.items()}
    return metrics, table


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """An evaluation job.

    Args:
        weights: ``"default"`` (the shipped weights) or a checkpoint path / URL (authors' format or bare state_dict).
        data: the pairs to score (``train.DataConfig``; synthetic scenes are scored with clean and degraded input).
        baseline_data: if set, also fit and score the root-polynomial baselines on these pairs.
        clip: clip reconstructions to [0, 1] before scoring (the authors' evaluation does).
        crop: score only ``[128:-128, 128:-128]`` (the challenge's scoring).
        mode: inference mode for sizes that are not multiples of 4 (``"authors"`` or ``"pad"``).
        output: Parquet file for the per-image rows.
    """

    weights: str = "default"
    data: Any = None
    baseline_data: Any = None
    clip: bool = True
    crop: bool = False
    mode: str = "authors"
    output: str = "runs/evaluate/metrics.parquet"

    @classmethod
    def from_toml(cls, path: str | Path) -> EvalConfig:
        from drcr_model.train import DataConfig

        with open(path, "rb") as f:
            d = tomllib.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown evaluation config keys {unknown}; known: {sorted(known)}")
        for key in ("data", "baseline_data"):
            if key in d:
                d[key] = DataConfig(**d[key])
        if d.get("data") is None:
            raise ValueError("evaluation config needs a [data] table")
        return cls(**d)


def run(config: EvalConfig) -> tuple[list[dict[str, Any]], str]:
    """Run an evaluation job; writes ``config.output`` and returns (rows, table)."""
    from drcr_model.checkpoint import load_model
    from drcr_model.train import build_pairs
    from drcr_model.weights import default_weights

    model = default_weights().load() if config.weights == "default" else load_model(config.weights)
    predictors: dict[str, Predictor] = {"drcr": drcr_predictor(model, config.mode)}
    if config.baseline_data is not None:
        predictors |= {k: v.predict for k, v in _baselines(build_pairs(config.baseline_data)).items()}
    data = config.data
    if data.source == "synthetic":
        inputs: Mapping[str, Sequence[Pair]] = heldout_synthetic(
            seed=data.seed,
            n_scenes=data.n_scenes,
            scene_size=data.scene_size,
            npe=data.npe,
            jpeg_quality=data.jpeg_quality,
        )
    else:
        inputs = {data.source: build_pairs(data)}
    rows = _evaluate_all(predictors, inputs, clip=config.clip, crop=config.crop)
    write_parquet(rows, config.output)
    return rows, format_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drcr_model.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="evaluation job spec (TOML), e.g. jobs/evaluate_synthetic.toml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = EvalConfig.from_toml(args.config)
    except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError) as e:
        log.error("bad config %s: %s", args.config, e)
        return 2
    _, table = run(config)
    print(table)  # the CLI's output; library code logs instead
    log.info("per-image metrics written to %s", config.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
