"""Shared pieces of the fault-injection tests (issue 5): the input set, the job spec, and the one check every
fault test ends with.

The check (:func:`check_against_reference`): every input has exactly one row in the final manifest; every
``ok`` cube (and every cube skipped as "already complete" by a resumed run) has its completion marker and is
byte-identical to the fault-free run's cube — the ``cube`` and ``wavelength`` arrays' metadata and every chunk
object, not the group attributes, which carry timestamps and worker ids — and no other group is marked complete.

Also: helpers to find and SIGKILL Ray actor worker processes by their process title, and the ``unshare``
prefix that runs a command in its own network and PID namespace (only ``lo`` up; when the namespace's first
process dies, the kernel kills everything left in it, so no Ray process outlives a test).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.sample import sample_image

REPO = Path(__file__).resolve().parents[2]
PREDICT_TITLE = "ray::MapWorker(MapBatches(Predict)).submit"
"""The process title Ray gives an inference actor while it runs a batch (Ray Data's actor pool worker for
``pipeline.predict.Predict``, method ``submit``)."""
PYTHON = str(Path(os.sys.executable))  # the venv's python (pytest runs under it)

# Inputs: loose PNGs and a tar of PNGs, 48×48 → 9 tiles of core 16 each (tiling forced with a small
# max_tile_pixels), batch_size 1 → one actor call per tile: ~400 actor calls, so kills land mid-batch.
N_LOOSE = 24
N_TAR = 16
SIDE = 48
N_INPUTS = N_LOOSE + N_TAR


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_inputs(fs: Any, bucket: str, *, seed: int = 5) -> None:
    """``<bucket>/in/loose/img_NN.png`` and ``<bucket>/in/batch.tar`` (members ``t/img_NN.png``)."""
    rng = np.random.default_rng(seed)
    for i in range(N_LOOSE):
        fs.pipe_file(f"{bucket}/in/loose/img_{i:02d}.png", png(sample_image(rng, SIDE, SIDE)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(N_TAR):
            data = png(sample_image(rng, SIDE, SIDE))
            info = tarfile.TarInfo(f"t/img_{i:02d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    fs.pipe_file(f"{bucket}/in/batch.tar", buf.getvalue())


def spec_dict(
    bucket_url: str, endpoint_url: str, output: str, weights: Mapping[str, str], **ray: Any
) -> dict[str, Any]:
    """The job spec (as a dict) every fault test and its reference run use; only ``output`` differs."""
    return {
        "name": "faults",
        "inputs": [f"{bucket_url}/in/"],
        "output": output,
        "weights": dict(weights),
        "storage": {
            "endpoint_url": endpoint_url,
            "key_env": "AWS_ACCESS_KEY_ID",
            "secret_env": "AWS_SECRET_ACCESS_KEY",
            "region": "us-east-1",
            "max_attempts": 10,
        },
        "tiling": {"max_tile_pixels": 1024, "tile_core": 16, "halo": 8},
        "output_options": {"chunk": 16},
        # batch_size is part of the fingerprint, so the reference uses the same value.
        "ray": {"actors": 1, "batch_size": 1, "max_images_in_flight": 2, "max_batches_per_actor": 2} | ray,
    }


def read_rows(fs: Any, output_path: str) -> list[dict[str, Any]]:
    fs.invalidate_cache()
    with fs.open(f"{output_path}/manifest/manifest.parquet", "rb") as f:
        return pq.read_table(f).to_pylist()


def _group_files(fs: Any, cubes_path: str) -> dict[str, dict[str, str]]:
    """``{group: {relative path under the group: sha256}}`` for the arrays (``cube/``, ``wavelength/``)."""
    out: dict[str, dict[str, str]] = {}
    fs.invalidate_cache()
    files = fs.find(cubes_path)
    for full in files:
        rel = full[len(cubes_path) :].lstrip("/")
        for array in ("/cube/", "/wavelength/"):
            if array in f"/{rel}":
                group, _, tail = f"/{rel}".partition(array)
                out.setdefault(group.lstrip("/"), {})[array.strip("/") + "/" + tail] = hashlib.sha256(
                    fs.cat_file(full)
                ).hexdigest()
                break
    return out


def complete_groups(fs: Any, cubes_path: str) -> set[str]:
    """Every group under ``cubes_path`` whose ``zarr.json`` says ``complete = 1``."""
    done = set()
    fs.invalidate_cache()
    for full in fs.find(cubes_path):
        if not full.endswith("/zarr.json"):
            continue
        meta = json.loads(fs.cat_file(full))
        if meta.get("node_type") == "group" and meta.get("attributes", {}).get("complete") == 1:
            done.add(full[len(cubes_path) :].strip("/").removesuffix("zarr.json").rstrip("/"))
    return done


def complete_groups_local(root: Path) -> set[str]:
    """Groups with a completion marker, read straight from the S3 server's data directory (plain files)."""
    done = set()
    for p in root.rglob("zarr.json") if root.exists() else []:
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError):  # being written
            continue
        if meta.get("node_type") == "group" and meta.get("attributes", {}).get("complete") == 1:
            done.add(str(p.parent.relative_to(root)))
    return done


class Reference:
    """The fault-free run's output: manifest rows by input and array file hashes by group."""

    def __init__(self, fs: Any, output_path: str) -> None:
        self.rows = {r["input"]: r for r in read_rows(fs, output_path)}
        self.files = _group_files(fs, f"{output_path}/cubes.zarr")
        assert all(r["status"] == "ok" for r in self.rows.values()), [
            r for r in self.rows.values() if r["status"] != "ok"
        ]
        assert set(self.files) == {r["group"] for r in self.rows.values()}


def check_against_reference(
    fs: Any, output_path: str, ref: Reference, *, allow_skipped_complete: bool = False
) -> dict[str, int]:
    """The end-of-test check of every fault test (see the module docstring); returns counts by status."""
    rows = read_rows(fs, output_path)
    inputs = [r["input"] for r in rows]
    assert len(inputs) == len(set(inputs)), "an input has more than one manifest row"
    assert set(inputs) == set(ref.rows), (sorted(set(ref.rows) - set(inputs)), sorted(set(inputs) - set(ref.rows)))
    cubes_path = f"{output_path}/cubes.zarr"
    files = _group_files(fs, cubes_path)
    done = complete_groups(fs, cubes_path)
    counts: dict[str, int] = {}
    good = set()
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        # A resumed run skips a finished cube as "already complete" (same bytes read again) or, planned from the
        # catalog, as "unchanged since run …" without reading it; both are cubes of an earlier run.
        error = r["error"] or ""
        is_resumed = (
            allow_skipped_complete
            and r["status"] == "skipped"
            and ("already complete" in error or error.startswith("unchanged since run"))
        )
        if r["status"] == "ok" or is_resumed:
            group = ref.rows[r["input"]]["group"]
            assert r["group"] == group
            assert group in done, f"{group}: row {r['status']} but no completion marker"
            got, want = files.get(group) or {}, ref.files[group]
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            assert got == want, f"{group}: cube differs from the fault-free run in {diff[:8]} (of {len(want)} files)"
            good.add(group)
    assert done == good, f"groups marked complete without an ok row: {sorted(done - good)}"
    return counts


# --- processes -----------------------------------------------------------------------------------------------


def pids_with_title(prefix: str) -> list[int]:
    """PIDs whose command line (Ray sets it to ``ray::Class.method`` in its workers) starts with ``prefix``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(prefix.encode()):
            found.append(int(entry))
    return found


def is_descendant(pid: int, root: int) -> bool:
    """Whether ``pid`` is ``root`` or one of its descendants (so a test only kills its own Ray's workers)."""
    for _ in range(64):
        if pid == root:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False


def proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def sigkill(pids: Iterable[int]) -> int:
    n = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            n += 1
        except ProcessLookupError:
            pass
    return n


def isolated(cmd: str, *, net: bool) -> list[str]:
    """``cmd`` (a shell line) in new PID and mount namespaces (own /proc), and with ``net`` a new network
    namespace with only ``lo`` up. The shell ``exec``s the command, so it is the namespace's PID 1: killing it
    kills every process of the namespace (Ray's GCS, raylets, workers)."""
    flags = ["-p", "-f", "-m", "--mount-proc", "--kill-child"] + (["-n"] if net else [])
    # Ray writes /tmp/ray/ray_current_cluster, which a later ray.init() without an address would join: the
    # namespace gets its own /tmp/ray (a tmpfs in its mount namespace) so nothing leaks to the host's Ray.
    setup = "mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray && " + ("ip link set lo up && " if net else "")
    return ["unshare", *flags, "sh", "-c", f"{setup}exec {cmd}"]


def run_cluster(cmd: list[str], result: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a ``_cluster_job.py`` command; if it runs past ``timeout``, fail with its stderr's tail and the last
    state it recorded (``result``'s ``.diag.json``: actors, unfinished tasks, autoscaler decisions)."""
    env = ray_env({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        diag = result.with_suffix(".diag.json")
        state = diag.read_text() if diag.exists() else "(no state recorded)"
        raise AssertionError(
            f"cluster job ran past {timeout} s\n--- stderr tail ---\n{err[-3000:]}\n--- state ---\n{state[-6000:]}"
        ) from None


def ray_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray subprocesses: loopback-only single-host mode, auth off in every process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra or {})
    return env
