"""The ``drcr-pipeline`` command: thin glue over the library; the only place that configures logging
and turns errors into exit codes (0: every input ok or skipped; 2: some inputs failed; 1: the job could
not run, e.g. a bad spec or unreadable weights)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pipeline.config import JobSpec, load_spec, parse_overrides
from pipeline.errors import PipelineError

EXIT_OK, EXIT_ERROR, EXIT_INPUTS_FAILED = 0, 1, 2

log = logging.getLogger("pipeline.cli")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drcr-pipeline", description="RGB archives → 31-band hyperspectral zarr cubes with DRCR Net, on Ray."
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job spec (or --input/--output) locally or on a Ray cluster")
    run.add_argument("--spec", help="TOML job spec (see jobs/)")
    run.add_argument(
        "--input", action="append", default=[], help="input URL or glob (repeatable); replaces the spec's inputs"
    )
    run.add_argument("--output", help="output prefix URL; replaces the spec's output")
    run.add_argument("--weights", help="checkpoint path or URL (default: the package's default weights)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set ray.actors=2 --set tiling.halo=16",
    )
    run.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=float("inf"),
        default=0.0,
        metavar="SECONDS",
        help="if another run holds the output's lease, wait for it (forever, or SECONDS) instead of exiting 1",
    )
    show = sub.add_parser("show-spec", help="print the effective job spec (after overrides) as TOML")
    for a in ("--spec", "--output", "--weights"):
        show.add_argument(a)
    show.add_argument("--input", action="append", default=[])
    show.add_argument("--set", action="append", default=[])
    sample = sub.add_parser("make-sample", help="write a small seeded sample archive of RGB images (for the demo)")
    sample.add_argument("dest", help="output folder")
    sample.add_argument("--count", type=int, default=6)
    sample.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def effective_spec(args: argparse.Namespace) -> JobSpec:
    overrides: dict[str, Any] = parse_overrides(args.set)
    if args.input:
        overrides["inputs"] = list(args.input)
    if args.output:
        overrides["output"] = args.output
    if args.weights:
        overrides["weights.path"] = args.weights
        overrides.setdefault("weights.sha256", "")
    if args.spec:
        return load_spec(args.spec).with_overrides(overrides)
    base = {"inputs": overrides.pop("inputs", []), "output": overrides.pop("output", "")}
    return JobSpec.from_dict(base).with_overrides(overrides)


def _run(args: argparse.Namespace) -> int:
    from pipeline.execution import init_ray, new_run_id, run_job
    from pipeline.lease import hold_lease
    from pipeline.storage import resolve_storage_options

    spec = effective_spec(args)
    # The lease first: a run refused because another holds the output exits before starting Ray.
    with hold_lease(spec.output, new_run_id(), resolve_storage_options(spec.storage), wait_s=args.wait) as lease:
        init_ray(args.address or spec.ray.address, num_cpus=args.num_cpus)
        return _run_held(args, spec, lease, run_job)


def _run_held(args: argparse.Namespace, spec: JobSpec, lease: Any, run_job: Any) -> int:
    from tqdm import tqdm

    bar = tqdm(total=0, unit="img", disable=args.no_progress, file=sys.stderr)

    def progress(event: str, n: int) -> None:
        if event == "total":
            bar.total = (bar.total or 0) + n
            bar.refresh()
        else:
            bar.update(n)

    try:
        summary = run_job(spec, progress=progress, lease=lease)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(
            f"{spec.name}: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped"
            f"{f' ({summary.unchanged} unchanged, not read)' if summary.unchanged else ''}; "
            f"{summary.megapixels:.2f} MP in {summary.elapsed_s:.1f} s ({summary.megapixels_per_s:.3f} MP/s)\n"
            f"manifest: {summary.manifest}\ncatalog: {summary.catalog}"
        )
    return EXIT_INPUTS_FAILED if summary.failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "show-spec":
            print(effective_spec(args).to_toml(), end="")
            return EXIT_OK
        if args.command == "make-sample":
            from pipeline.sample import make_sample

            for path in make_sample(args.dest, count=args.count, seed=args.seed):
                print(path)
            return EXIT_OK
    except PipelineError as exc:
        from pipeline.storage import describe_error

        print(f"drcr-pipeline: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # CheckpointError and other argument errors from the model package
        from pipeline.storage import describe_error

        print(f"drcr-pipeline: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
