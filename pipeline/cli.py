"""The ``drcr-pipeline`` command: thin glue over the library; the only place that configures logging
and turns errors into exit codes (0: every input ok or skipped; 2: some inputs failed; 1: the job could
not run, e.g. a bad spec or unreadable weights)."""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    rep = sub.add_parser("report", help="(re)write OUTPUT/report.html, the STAC catalog and consolidated metadata")
    rep.add_argument("output", help="the job's output prefix URL")
    _storage_args(rep)
    exp = sub.add_parser("export", help="write the cubes of OUTPUT as netCDF, ENVI or TIFF files")
    exp.add_argument("output", help="the job's output prefix URL")
    exp.add_argument("--format", required=True, choices=["netcdf", "envi", "tiff"])
    exp.add_argument("--dest", help="folder or URL for the files (default: OUTPUT/export/FORMAT)")
    exp.add_argument("--where", help='pandas-style filter on manifest columns, e.g. "qa_backprojection_mrae < 0.3"')
    _storage_args(exp)
    sample = sub.add_parser("make-sample", help="write a small seeded sample archive of RGB images (for the demo)")
    sample.add_argument("dest", help="output folder")
    sample.add_argument("--count", type=int, default=6)
    sample.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="job spec whose [storage] section reaches OUTPUT (S3 endpoint, key variables)")


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.storage import resolve_storage_options

    return resolve_storage_options(load_spec(args.spec).storage) if args.spec else {}


def _report(args: argparse.Namespace) -> int:
    from pipeline.publish import publish_run

    published = publish_run(args.output, _storage_options(args))
    for key, value in published.items():
        print(f"{key}: {value if isinstance(value, str) else ', '.join(map(str, value)) or '-'}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import export_cubes

    written = export_cubes(
        args.output, args.format, dest=args.dest, where=args.where, storage_options=_storage_options(args)
    )
    for url in written:
        print(url)
    return EXIT_OK


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


def _check_storage(spec: JobSpec) -> None:
    """First contact with every store the job uses, before Ray starts: a missing bucket, an output that is a
    file, or an endpoint that refuses or never answers is one line and exit 1, within storage.deadline_s."""
    from pipeline import storage

    opts = storage.resolve_storage_options(spec.storage)
    deadline = storage.deadline_of(spec.storage)
    storage.check_reachable(spec.output, opts, deadline_s=deadline, output=True)
    for url in spec.inputs:
        storage.check_reachable(url, opts, deadline_s=deadline, output=False)


def _run(args: argparse.Namespace) -> int:
    spec = effective_spec(args)
    _check_storage(spec)
    address = args.address or spec.ray.address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        # Ray reads this once, when ray is imported: with "0" a local Ray stays on the loopback address it
        # is given instead of resolving 127.0.0.1 to the host's routable address (issue 15, item 15).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from pipeline.execution import init_ray, new_run_id, run_job
    from pipeline.lease import hold_lease
    from pipeline.storage import resolve_storage_options

    # The lease first: a run refused because another holds the output exits before starting Ray.
    with hold_lease(spec.output, new_run_id(), resolve_storage_options(spec.storage), wait_s=args.wait) as lease:
        init_ray(address, num_cpus=args.num_cpus)
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
        if summary.published.get("report"):  # with --json it is in the summary's "published"
            print(f"report: {summary.published['report']}")
    return EXIT_INPUTS_FAILED if summary.failed else EXIT_OK


def _configure_logging(verbose: int) -> None:
    """Log to stderr at WARNING, INFO (-v) or DEBUG (-vv); every record goes through the redacting filter."""
    from pipeline.storage import RedactingFilter

    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _error(exc: BaseException) -> int:
    """One line on stderr, no traceback, no secret; exit 1."""
    from pipeline.storage import describe_error

    print(f"drcr-pipeline: error: {describe_error(exc)}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from pipeline.storage import client_error_types

    anticipated: tuple[type[BaseException], ...] = (PipelineError, ValueError, OSError, *client_error_types())
    try:
        return _dispatch(args)
    except anticipated as exc:
        # ValueError: CheckpointError and argument errors of the model package; OSError: files and
        # storage (missing, forbidden, unreachable). Anything else is a bug and keeps its traceback.
        return _error(exc)
    except KeyboardInterrupt:
        print("drcr-pipeline: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "show-spec":
        print(effective_spec(args).to_toml(), end="")
        return EXIT_OK
    if args.command == "report":
        return _report(args)
    if args.command == "export":
        return _export(args)
    if args.command == "make-sample":
        from pipeline.sample import make_sample

        for path in make_sample(args.dest, count=args.count, seed=args.seed):
            print(path)
        return EXIT_OK
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
