"""Fault injection (issue 5): the job survives faults with nothing lost, and the result is what a fault-free
run gives, byte for byte.

Real local Ray, the real local S3 server; each test ends with
:func:`_fault_helpers.check_against_reference`. Figures measured with these tests are in RELIABILITY.md.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fault_helpers as fh  # noqa: E402

from pipeline.config import JobSpec  # noqa: E402
from pipeline.storage import open_fs  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fault_bucket(s3_server, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One bucket with the inputs, shared by the reference run and every fault test (outputs differ)."""
    from drcr_model.weights import untrained_demo_weights

    if not s3_server.is_running:
        s3_server.start()
    name = f"faults-{uuid.uuid4().hex[:10]}"
    url = s3_server.create_bucket(name)
    fs, _ = open_fs(url, s3_server.storage_options())
    fh.write_inputs(fs, name)
    # A tiny seeded model written here, so the tests do not depend on (or slow down with) the package default.
    w = untrained_demo_weights(cache_dir=tmp_path_factory.mktemp("weights"))
    return SimpleNamespace(url=url, name=name, fs=fs, server=s3_server, weights={"path": w.url, "sha256": w.sha256})


def _spec(bucket: Any, out: str, **ray: Any) -> JobSpec:
    return JobSpec.from_dict(fh.spec_dict(bucket.url, bucket.server.endpoint_url, f"{bucket.url}/{out}", bucket.weights, **ray))


@pytest.fixture(scope="module")
def reference(fault_bucket, ray_local):  # type: ignore[no-untyped-def]
    """The fault-free run every fault test is compared with."""
    from pipeline.execution import run_job

    t0 = time.perf_counter()
    summary = run_job(_spec(fault_bucket, "clean"))
    elapsed = time.perf_counter() - t0
    assert (summary.ok, summary.failed, summary.skipped) == (fh.N_INPUTS, 0, 0)
    print(f"\n[figures] clean run: {fh.N_INPUTS} images in {elapsed:.1f} s")
    return SimpleNamespace(ref=fh.Reference(fault_bucket.fs, f"{fault_bucket.name}/clean"), elapsed=elapsed)


def test_reference_run(reference) -> None:  # type: ignore[no-untyped-def]
    assert len(reference.ref.rows) == fh.N_INPUTS


class _Killer(threading.Thread):
    """Calls ``fire()`` ``times`` times, ``every`` seconds apart, the first once ``ready()`` is true."""

    def __init__(self, fire: Any, *, times: int, every: float, ready: Any = lambda: True, first_after: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.fire, self.times, self.every, self.ready, self.first_after = fire, times, every, ready, first_after
        self.log: list[tuple[float, Any]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set() and not self.ready():
            self.stop.wait(0.05)
        self.stop.wait(self.first_after)
        while not self.stop.is_set() and len(self.log) < self.times:
            what = self.fire()
            if what:
                self.log.append((round(time.perf_counter() - self.t0, 2), what))
                self.stop.wait(self.every)
            else:
                self.stop.wait(0.05)


def test_inference_actor_killed_repeatedly(fault_bucket, reference, ray_local) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the inference actor's worker process 4 times while it runs a batch: Ray restarts the actor
    (max_restarts=-1) and retries the lost calls (max_task_retries=3); every image ends ok and identical."""
    from pipeline.execution import run_job

    me = os.getpid()

    def busy_actor_pids() -> list[int]:
        # Ray titles a worker "ray::_PredictorActor.run" while it executes run(); ours descend from this process.
        return [p for p in fh.pids_with_title("ray::_PredictorActor.run") if fh.is_descendant(p, me)]

    def kill() -> list[str] | None:
        pids = busy_actor_pids()
        return [fh.proc_title(p) for p in pids] if fh.sigkill(pids) else None

    killer = _Killer(kill, times=4, every=2.5, ready=lambda: bool(busy_actor_pids()), first_after=1.0)
    killer.start()
    t0 = time.perf_counter()
    try:
        summary = run_job(_spec(fault_bucket, "actor_kills"))
    finally:
        killer.stop.set()
        killer.join()
    elapsed = time.perf_counter() - t0
    print(f"\n[figures] actor kills: {len(killer.log)} kills at {[t for t, _ in killer.log]} s; {elapsed:.1f} s vs {reference.elapsed:.1f} s clean; ok={summary.ok} failed={summary.failed}")
    assert len(killer.log) == 4, killer.log
    counts = fh.check_against_reference(fault_bucket.fs, f"{fault_bucket.name}/actor_kills", reference.ref)
    assert counts == {"ok": fh.N_INPUTS}
