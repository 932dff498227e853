"""The pipeline on a real Ray cluster started with ``ray start`` (issue 4): submitted as a Ray Job, and run
across two nodes.

Each test runs ``tests/cluster.py`` in its own network, PID and mount namespaces (``unshare``; only ``lo``
up): it starts the cluster on 127.0.0.1, runs one command against it, and ``ray stop --force`` there cannot
touch any other Ray on the machine (the test session's own ``ray_local`` included). Inputs are the seeded
sample (:func:`pipeline.sample.make_sample`) in a local temp dir, which every node of a one-machine cluster
sees; the model is the small seeded untrained one, for speed.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cluster  # noqa: E402

from pipeline.config import JobSpec  # noqa: E402
from pipeline.sample import make_sample  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not cluster.can_isolate(), reason="needs `unshare` with network/PID namespaces (root)"),
]

BIN = Path(sys.executable).parent
N_IMAGES = 6  # make_sample's default: 3 in photos.tar, 2 in photos.zip, 1 loose


def _write_spec(tmp_path: Path, **ray: Any) -> tuple[Path, Path]:
    """A job spec over a fresh sample in ``tmp_path``; returns (spec file, output dir). Absolute paths, since a
    Ray Job's entrypoint runs in a directory of the job supervisor's choosing."""
    from drcr_model.weights import untrained_demo_weights

    sample = tmp_path / "sample"
    make_sample(sample, count=N_IMAGES, seed=3)
    w = untrained_demo_weights(cache_dir=tmp_path / "weights")
    out = tmp_path / "out"
    spec = JobSpec.from_dict(
        {
            "name": "cluster-test",
            "inputs": [str(sample / "photos.tar"), str(sample / "photos.zip"), f"{sample / 'loose'}/"],
            "output": str(out),
            "weights": {"path": w.url, "sha256": w.sha256},
            # Small tiles, so every image is several batches and both actors of the two-node run get work.
            "tiling": {"max_tile_pixels": 2048, "tile_core": 32, "halo": 8},
            "output_options": {"chunk": 32},
            "ray": {"actors": 1, "batch_size": 2, "max_images_in_flight": 4} | ray,
        }
    )
    path = tmp_path / "job.toml"
    path.write_text(spec.to_toml())
    return path, out


def _run(label: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    print(f"\n[timing] {label}: {time.monotonic() - t0:.1f} s (cluster start and stop included)")
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def _summary_json(stdout: str) -> dict[str, Any]:
    """The ``--json`` summary among whatever else the command printed (Ray forwards worker output)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.rstrip() == "{")
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip() == "}")
    return json.loads("\n".join(lines[start : end + 1]))  # type: ignore[no-any-return]


def _check_output(out: Path) -> list[dict[str, Any]]:
    """Every sample image has an ``ok`` row and a complete cube; returns the provenance of each cube."""
    import zarr

    from pipeline import cubes

    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    assert len(rows) == N_IMAGES and {r["status"] for r in rows} == {"ok"}, rows
    store = cubes.open_cubes(str(out), {})
    provs = []
    for r in rows:
        attrs = cubes.read_status(store, r["group"])
        assert attrs is not None and attrs["complete"] is True
        assert zarr.open_array(store, path=f"{r['group']}/cube", mode="r").shape[0] == 31
        provs.append(attrs[cubes.ATTR])
    return provs


def test_ray_job_submit(tmp_path: Path) -> None:
    """``ray job submit -- drcr-pipeline run --spec ...`` to a head with the dashboard: the job SUCCEEDS and
    writes every cube and the manifest."""
    spec, out = _write_spec(tmp_path)
    job_id = f"drcr-test-{tmp_path.name[-8:]}"
    status = (
        "from ray.job_submission import JobSubmissionClient; import os; "
        f"i = JobSubmissionClient(os.environ['RAY_API_SERVER_ADDRESS']).get_job_info({job_id!r}); "
        "print('JOB_STATUS', i.status.value, i.entrypoint)"
    )
    # The CLI is what the README shows; it tails the job's logs and exits 1 if the job FAILED. The status
    # is then read back through the SDK (JobSubmissionClient) as well.
    script = (
        f"{shlex.quote(str(BIN / 'ray'))} job submit --submission-id={job_id} -- "
        f"drcr-pipeline run --spec {shlex.quote(str(spec))} --no-progress --json "
        f"&& {shlex.quote(sys.executable)} -c {shlex.quote(status)}"
    )
    proc = _run(
        "ray job submit", cluster.isolated_command(["sh", "-c", script], head_cpus=2, dashboard=True), timeout=300
    )
    assert f"JOB_STATUS SUCCEEDED drcr-pipeline run --spec {spec}" in proc.stdout, proc.stdout[-4000:]
    summary = _summary_json(proc.stdout)
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (N_IMAGES, 0, 0)
    _check_output(out)


def test_two_nodes(tmp_path: Path) -> None:
    """Two nodes of 1 CPU each and two actors of 0.75 CPU: no node can hold both actors, so inference runs on
    both nodes, as the summary and each cube's provenance show. The driver runs in the namespace too."""
    spec, out = _write_spec(tmp_path, actors=2, num_cpus_per_actor=0.75, decode_num_cpus=0.25)
    argv = [str(BIN / "drcr-pipeline"), "run", "--spec", str(spec), "--no-progress", "--json"]
    proc = _run("two-node run", cluster.isolated_command(argv, head_cpus=1, node_cpus=[1]), timeout=300)
    summary = _summary_json(proc.stdout)
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (N_IMAGES, 0, 0)
    assert len(set(summary["nodes"])) == 2, summary
    provs = _check_output(out)
    workers = {w for p in provs for w in p["workers"]}
    assert {w.removeprefix("node:") for w in workers if w.startswith("node:")} == set(summary["nodes"]), workers
