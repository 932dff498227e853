"""Reproduce the default weights shipped in ``drcr_model/weights/`` (trained on synthetic scenes).

    nice -n 10 python benchmarks/train_default_weights.py                  # train the chain, export + evaluate
    nice -n 10 python benchmarks/train_default_weights.py --stage train --resume   # continue a stopped run
    python benchmarks/train_default_weights.py --stage export              # reuse the last job's last.pth
    python benchmarks/train_default_weights.py --stage table               # README "Weights" table from default.json
    python benchmarks/train_default_weights.py --config JOB --stage curve --every 200   # held-out + validation curve of JOB
    nice -n 10 python benchmarks/train_default_weights.py --config jobs/default_weights_finetune.toml

A job whose ``init_weights`` is another job's ``last.pth`` (``jobs/default_weights_finetune.toml`` starts
from ``jobs/default_weights.toml``) is trained after that job, and that one after its own (the chain is
found in ``jobs/``), each with a fresh optimizer and lr schedule.

Stages:
1. ``init``: train the jobs ``--config`` starts from (its ``init_weights``, and theirs), first job first.
2. ``train``: train the ``--config`` job in this process (CPU), a checkpoint every ``checkpoint_every``
   iterations (``checkpoint_{iter:08d}.pth`` and ``last.pth``), stopping early if ``--max-minutes`` of wall
   time run out; the iteration reached is recorded and ``--resume`` continues from ``last.pth`` bit for bit.
3. ``export``: write the bare state_dict to ``drcr_model/weights/default.pt``, evaluate it on held-out
   synthetic scenes (clean and degraded input) next to the root-polynomial baselines, write the metrics
   as Parquet + a printed table, and write ``drcr_model/weights/default.json`` (the ``Weights`` record).
4. ``table``: print the README "Weights" table from ``default.json``.
5. ``curve``: the MRAE / RMSE (DRCR only, clean and degraded input) on the held-out scenes and on the
   validation scenes (``VALIDATION``: other seeds, for choosing between runs) of the ``--config`` job's
   start (its ``init_weights``, when set), of every ``--every``-th checkpoint and of ``last.pth``, as a
   table; nothing is exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drcr_model.train import TrainConfig, Trainer, make_dataset, poly_lr  # noqa: E402

log = logging.getLogger("train_default_weights")

WEIGHTS_DIR = REPO / "drcr_model" / "weights"
#: The job that made the shipped weights (its init chain is found in ``jobs/``): the default ``--config``, so
#: the plain command reproduces them rather than overwriting them with an earlier job's.
SHIPPED_JOB = REPO / "jobs" / "default_weights_scene64_seed7.toml"
#: The scenes the README's Weights table reports (``jobs/evaluate_synthetic.toml`` scores the same ones). 64,
#: because one scene moved an 8-scene mean by 0.07 (the first 8 of these were the set until 2026-12-02).
HELDOUT = {"seed": 1000, "n_scenes": 64, "scene_size": 256}
#: Scenes for choosing between runs and checkpoints (the curve shows both), so that choices are not made on
#: the held-out scenes the README's table reports.
VALIDATION = {"seed": 2000, "n_scenes": 48, "scene_size": 256}
README_ROWS = (
    ("drcr", "DRCR {channels}/{n_blocks} (default.pt)"),
    ("rootpoly2_ls", "root-poly deg 2, least squares"),
    ("rootpoly2_relative", "root-poly deg 2, 1/gt-weighted"),
)
README_COLUMNS = (("mrae", 3), ("rmse", 3), ("psnr", 2), ("sam_deg", 1), ("backprojection_mrae", 3))


def _summary_path(config: TrainConfig) -> Path:
    return Path(config.out_dir) / "train_summary.json"


def stage_train(config: TrainConfig, max_minutes: float, *, resume: bool = False) -> None:
    torch.set_num_threads(config.threads or torch.get_num_threads())
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, make_dataset(config))
    log_rows: list[dict[str, float]] = []
    seconds_before = 0.0
    if resume and (out / "last.pth").exists():
        trainer.load(out / "last.pth")
        if _summary_path(config).exists():
            previous = json.loads(_summary_path(config).read_text())
            log_rows = [r for r in previous["loss_log"] if r["iter"] <= trainer.iteration]
            seconds_before = previous["train_seconds"]
        log.info("resumed %s at iteration %d", out / "last.pth", trainer.iteration)
    deadline = time.monotonic() + 60 * max_minutes if max_minutes > 0 else float("inf")
    t0 = time.perf_counter()
    start = trainer.iteration

    def summarize() -> None:
        seconds = seconds_before + time.perf_counter() - t0
        summary = {
            "iterations_done": trainer.iteration,
            "iterations_planned": config.total_iterations,
            "train_seconds": round(seconds, 1),
            "steps_per_second": round((trainer.iteration - start) / max(time.perf_counter() - t0, 1e-9), 3),
            "final_loss": log_rows[-1]["loss"] if log_rows else None,
            "loss_log": log_rows,
        }
        _summary_path(config).write_text(json.dumps(summary, indent=1))

    while trainer.iteration < config.total_iterations and time.monotonic() < deadline:
        until = min(trainer.iteration + config.log_every, config.total_iterations)
        trainer.run(until, on_log=log_rows.append)
        if trainer.iteration % config.checkpoint_every == 0:
            trainer.save(out / f"checkpoint_{trainer.iteration:08d}.pth")
            trainer.save(out / "last.pth")
            summarize()
    trainer.save(out / "last.pth")
    summarize()
    log.info("trained %s to iteration %d", out, trainer.iteration)


def stage_export(config: TrainConfig, chain: list[TrainConfig], config_path: str) -> None:
    from drcr_model.evaluate import evaluate_default_weights

    out = Path(config.out_dir)
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    summary = json.loads(_summary_path(config).read_text())
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    pt = WEIGHTS_DIR / "default.pt"
    torch.save(ckpt["state_dict"], pt)
    sha = hashlib.sha256(pt.read_bytes()).hexdigest()
    # The baselines are fitted on the first job's scenes whatever job trained last, so the table (and the goal
    # relative to the baselines) does not move with the data of a fine-tune.
    metrics, table = evaluate_default_weights(pt, chain[0] if chain else config, out_dir=out, **HELDOUT)
    done = summary["iterations_done"]
    meta: dict[str, Any] = {
        "trained_on": "synthetic scenes (drcr_model.scenes: earthlib + ColorChecker reflectances, colour-science "
        "illuminants), NOT ARAD_1K; use the authors' checkpoint for real images",
        "training_recipe": dataclasses.replace(config, iterations=done).to_dict(),
        "data_seed": config.data.seed,
        "heldout": HELDOUT,
        "iterations": done,
        "train_seconds": summary["train_seconds"],
        "steps_per_second": summary["steps_per_second"],
        "parameters": sum(v.numel() for v in ckpt["state_dict"].values()),
        "reproduce": f"nice -n 10 python benchmarks/train_default_weights.py --config {_repo_relative(config_path)}",
        "torch": torch.__version__,
    }
    if chain:  # init jobs run without a wall-time cap, so to their configured iterations
        meta["init_recipes"] = [job.to_dict() for job in chain]
        meta["iterations_total"] = sum(job.total_iterations for job in chain) + done
    record = {
        "name": f"drcr-synthetic-c{config.model.channels}-b{config.model.n_blocks}",
        "file": "default.pt",
        "sha256": sha,
        "config": dataclasses.asdict(config.model),
        "preprocessing": "divide_by_image_max",
        "camera": "ntire2022",
        "bands_nm": list(range(400, 701, 10)),
        "metrics": metrics,
        "meta": meta,
    }
    (WEIGHTS_DIR / "default.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table)


def _heldout_mrae_rmse(model: torch.nn.Module, heldout: dict[str, list[Any]]) -> list[float]:
    from drcr_model.evaluate import drcr_predictor
    from drcr_model.metrics import mrae, rmse

    predict = drcr_predictor(model)
    values = []
    for inp in ("clean", "degraded"):
        recs = [predict(p.rgb) for p in heldout[inp]]
        values.append(sum(mrae(p.cube, r) for p, r in zip(heldout[inp], recs)) / len(recs))
        values.append(sum(rmse(p.cube, r) for p, r in zip(heldout[inp], recs)) / len(recs))
    return values


def curve_table(config: TrainConfig, every: int) -> str:
    """Held-out and validation MRAE / RMSE of a job's checkpoints (every ``every`` iterations, then ``last.pth``)."""
    from drcr_model.checkpoint import extract_state_dict, infer_config, load_state_dict, read_checkpoint
    from drcr_model.evaluate import heldout_synthetic
    from drcr_model.net import DRCRNet

    out = Path(config.out_dir)
    points: list[tuple[int, str]] = [(0, config.init_weights)] if config.init_weights else []
    for ck in sorted(out.glob("checkpoint_*.pth")):
        it = int(ck.stem.removeprefix("checkpoint_"))
        if it % every == 0:
            points.append((it, str(ck)))
    last = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    if not points or int(last["iter"]) != points[-1][0]:
        points.append((int(last["iter"]), str(out / "last.pth")))
    cache_path = out / "heldout_curve.json"  # values by checkpoint sha256 and scene set: a rerun scores new files
    cache: dict[str, list[float]] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    scene_sets = {"held-out": HELDOUT, "validation": VALIDATION}
    loaded: dict[str, dict[str, list[Any]]] = {}
    header = ["iterations", "lr"] + [
        f"{name} {inp} {m}" for name in scene_sets for inp in ("clean", "degraded") for m in ("MRAE", "RMSE")
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for it, source in points:
        obj, sha = read_checkpoint(source)
        net: DRCRNet | None = None  # built once per checkpoint, and only if a scene set is not cached
        values: list[float] = []
        for name, scenes in scene_sets.items():
            key = f"{sha} {json.dumps(scenes, sort_keys=True)}"
            if key not in cache:
                if name not in loaded:
                    loaded[name] = heldout_synthetic(**scenes)
                if net is None:  # its own configuration: a deepening job starts from a shallower checkpoint
                    sd = extract_state_dict(obj, source=source)
                    net = DRCRNet(**infer_config(sd, source=source))
                    load_state_dict(net, sd, source=source)
                cache[key] = _heldout_mrae_rmse(net, loaded[name])
                cache_path.write_text(json.dumps(cache, indent=1))
            values += cache[key]
        lr = poly_lr(config.lr, it, config.max_iter, config.lr_power)
        lines.append(f"| {it} | {lr:.2g} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        log.info("%s: %s", source, lines[-1])
    return "\n".join(lines)


def readme_table(record: dict[str, Any]) -> str:
    """The README "Weights" table: held-out metrics of the default weights and both baselines."""
    lines = [
        "| method | input | MRAE | RMSE | PSNR | SAM° | back-proj. MRAE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for inp in ("clean", "degraded"):
        means = record["metrics"][f"synthetic_heldout_{inp}"]
        best = {c: (max if c == "psnr" else min)(means[m][c] for m, _ in README_ROWS) for c, _ in README_COLUMNS}
        for method, label in README_ROWS:
            cells = []
            for c, digits in README_COLUMNS:
                v = f"{means[method][c]:.{digits}f}"
                cells.append(f"**{v}**" if means[method][c] == best[c] else v)
            lines.append(f"| {label.format(**record['config'])} | {inp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _repo_relative(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def init_chain(config: TrainConfig) -> list[TrainConfig]:
    """The jobs ``config`` starts from, first job first (empty when it starts from scratch): each job's
    ``init_weights`` must be the ``last.pth`` of exactly one ``jobs/default_weights*.toml``."""
    jobs = [TrainConfig.from_toml(str(f)) for f in sorted((REPO / "jobs").glob("default_weights*.toml"))]
    chain: list[TrainConfig] = []
    job = config
    while job.init_weights:
        parents = [c for c in jobs if Path(c.out_dir) / "last.pth" == Path(job.init_weights)]
        if len(parents) != 1:
            raise ValueError(f"{job.init_weights=}: {len(parents)} jobs in jobs/ write it; expected one")
        job = parents[0]
        if job in chain:
            raise ValueError(f"{job.out_dir}: the init_weights of jobs/ form a cycle")
        chain.insert(0, job)
    return chain


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(SHIPPED_JOB))
    p.add_argument("--stage", choices=["all", "init", "train", "export", "table", "curve"], default="all")
    p.add_argument("--every", type=int, default=200, help="curve: evaluate every this many iterations")
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall-time cap for the final job (0: none)")
    p.add_argument("--iterations", type=int, help="override the final job's iterations")
    p.add_argument("--resume", action="store_true", help="continue the final job from its last.pth")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.stage == "table":
        print(readme_table(json.loads((WEIGHTS_DIR / "default.json").read_text())))
        return 0
    config = TrainConfig.from_toml(args.config)
    if args.iterations is not None:
        config = dataclasses.replace(config, iterations=args.iterations)
    if args.stage == "curve":
        torch.set_num_threads(config.threads or torch.get_num_threads())
        print(curve_table(config, args.every))
        return 0
    chain = init_chain(config)
    if args.stage in ("all", "init"):
        for job in chain:
            stage_train(job, 0.0)
    if args.stage in ("all", "train"):
        stage_train(config, args.max_minutes, resume=args.resume)
    if args.stage in ("all", "export"):
        stage_export(config, chain, args.config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
