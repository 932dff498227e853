"""Fault injection (issue 5): the job survives faults with nothing lost, and the result is what a fault-free
run gives, byte for byte.

Real local Ray, the real local S3 server; each test ends with
:func:`_fault_helpers.check_against_reference`. Figures measured with these tests are in RELIABILITY.md.
"""

from __future__ import annotations

import os
import signal
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
    return JobSpec.from_dict(
        fh.spec_dict(bucket.url, bucket.server.endpoint_url, f"{bucket.url}/{out}", bucket.weights, **ray)
    )


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

    def __init__(
        self, fire: Any, *, times: int, every: float, ready: Any = lambda: True, first_after: float = 0.0
    ) -> None:
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
    (Ray Data's pool: max_restarts=-1) and retries the lost calls; every image ends ok and identical."""
    from pipeline.execution import run_job

    me = os.getpid()

    def busy_actor_pids() -> list[int]:
        # Ray titles an actor fh.PREDICT_TITLE while it runs a batch; ours descend from this process.
        return [p for p in fh.pids_with_title(fh.PREDICT_TITLE) if fh.is_descendant(p, me)]

    seen: dict[int, float] = {}
    killed: set[int] = set()

    def kill() -> list[str] | None:
        # Only a worker that has been up for a second: the restarted actor's first call is the retry of the
        # batch just lost, and killing that one again and again is the "poison batch" case (see below).
        now = time.perf_counter()
        pids = [p for p in busy_actor_pids() if now - seen.setdefault(p, now) >= 1.0 and p not in killed]
        killed.update(pids)
        return [fh.proc_title(p) for p in pids] if fh.sigkill(pids) else None

    killer = _Killer(kill, times=4, every=1.0, ready=lambda: bool(busy_actor_pids()), first_after=1.0)
    killer.start()
    t0 = time.perf_counter()
    try:
        summary = run_job(_spec(fault_bucket, "actor_kills"))
    finally:
        killer.stop.set()
        killer.join()
    elapsed = time.perf_counter() - t0
    print(
        f"\n[figures] actor kills: {len(killer.log)} kills at {[t for t, _ in killer.log]} s; {elapsed:.1f} s vs {reference.elapsed:.1f} s clean; ok={summary.ok} failed={summary.failed}"
    )
    assert len(killer.log) == 4, killer.log
    counts = fh.check_against_reference(fault_bucket.fs, f"{fault_bucket.name}/actor_kills", reference.ref)
    assert counts == {"ok": fh.N_INPUTS}, [
        (r["input"], r["error_type"], r["error"])
        for r in fh.read_rows(fault_bucket.fs, f"{fault_bucket.name}/actor_kills")
        if r["status"] != "ok"
    ]


def test_worker_node_killed(fault_bucket, reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A two-node cluster (head + ``ray start --address`` worker, in a network namespace with only ``lo``);
    the worker node's process group is SIGKILLed while its actor runs a batch. The GCS marks the node dead,
    the actor restarts on the head, lost tiles are rebuilt from lineage: every image ends ok and identical."""
    import json

    server = fault_bucket.server
    result = tmp_path / "result.json"
    params = {
        # A 3-CPU head: after the kill it holds both actors and a prepare task (a fixed pool of 2 needs that).
        # The kill comes 1 s after a cube the worker's actor computed is complete (with "1 s after it starts
        # computing", on the loaded box its first block of records had not come back: inference on 1 node).
        "s3_root": str(server.root), "key": server.key, "secret": server.secret, "result": str(result), "kill": True, "kill_after": 1.0, "head_cpus": 3,
        "spec": fh.spec_dict(fault_bucket.url, server.endpoint_url, f"{fault_bucket.url}/node_kill", fault_bucket.weights, actors=2),
    }  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    cmd = fh.isolated(f"{fh.PYTHON} {Path(__file__).parent / '_cluster_job.py'} {tmp_path / 'params.json'}", net=True)
    # "0" makes `ray start --address` refuse to join ("multi-node clusters are not supported"); inside the
    # namespace only lo exists, so "1" still resolves every node to 127.0.0.1. Same value in every process there.
    proc = fh.run_cluster(cmd, result, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(result.read_text())
    s = out["summary"]
    server.restart()  # the host's rclone caches directory listings; the namespace's rclone wrote the output
    print(
        f"\n[figures] worker node kill: {out['kill']}; {out['elapsed_s']:.1f} s vs {reference.elapsed:.1f} s clean (1 node); ok={s['ok']} failed={s['failed']}; inference on nodes {len(s['nodes'])}"
    )
    assert out["kill"].get("busy_actor_on_worker") is True, out
    assert out["worker"] in s["nodes"] and out["head"] in s["nodes"]  # both nodes ran inference
    assert out["worker"] not in out["alive_after"]
    assert server.secret not in proc.stdout + proc.stderr
    counts = fh.check_against_reference(fault_bucket.fs, f"{fault_bucket.name}/node_kill", reference.ref)
    assert counts == {"ok": fh.N_INPUTS}


def test_pool_grows_onto_a_node_that_joins_mid_job(fault_bucket, reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An elastic pool (ray.min_actors = 1, ray.max_actors = 2) on a one-CPU head that holds only one actor; a
    second node is started as the job starts and joins while it runs. Ray Data adds an actor there, so
    inference runs on both nodes, and every cube is byte-identical to the fault-free 1-actor run's."""
    import json

    server = fault_bucket.server
    result = tmp_path / "result.json"
    # Ray Data grows a pool when its utilisation (calls in flight ÷ the actors' concurrent calls) reaches 1.75,
    # and only within the predict operator's CPU budget. Utilisation: inference must be the slow stage, so
    # few prepare tasks (2 in flight: with 6, each a process decoding and running the statistics passes on
    # this 2-core box, prepare was the slow stage and the actor idled below 0.5 the whole job), calls in turn
    # (overlap_writes false: one concurrent call) and 4 queued per actor. Budget: with a 1-CPU head and a
    # 2-CPU worker, half the 3 CPUs is reserved in equal parts for the two operators (0.75 each), the rest
    # shared; prepare's 2 × 0.25 stays within its part, so the predict operator's share admits a second
    # 0.75-CPU actor, and the worker has room for it. (A 1-CPU worker and 8 prepare tasks in flight: the
    # autoscaler wanted the actor and answered "exceeded resource limits" to the end.)
    ray = {
        "actors": 1,
        "min_actors": 1,
        "max_actors": 2,
        "num_cpus_per_actor": 0.75,
        "decode_num_cpus": 0.25,
        "max_images_in_flight": 2,
        "overlap_writes": False,
        "max_batches_per_actor": 4,
    }
    params = {
        "s3_root": str(server.root), "key": server.key, "secret": server.secret, "result": str(result), "join": 1,
        "head_cpus": 1, "worker_cpus": 2,
        "spec": fh.spec_dict(fault_bucket.url, server.endpoint_url, f"{fault_bucket.url}/grow", fault_bucket.weights, **ray),
    }  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    cmd = fh.isolated(f"{fh.PYTHON} {Path(__file__).parent / '_cluster_job.py'} {tmp_path / 'params.json'}", net=True)
    proc = fh.run_cluster(cmd, result, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(result.read_text())
    s = out["summary"]
    server.restart()  # the host's rclone caches directory listings; the namespace's rclone wrote the output
    actors = [a for a in out["kill"]["actors"] if "MapBatches(Predict)" in a["class"]]
    print(
        f"\n[figures] node joins mid-job: joined at {out['kill'].get('joined_s')} s of {out['elapsed_s']:.1f} s "
        f"({out['kill'].get('complete_before_join')} of {fh.N_INPUTS} cubes complete then, {out['kill'].get('join_attempts')} node start(s)); "
        f"ok={s['ok']}; inference on nodes {len(s['nodes'])}; pool actors {[(a['node'], a['state']) for a in actors]}; "
        f"autoscaler {out['kill']['autoscaler']}"
    )
    assert "joined_s" in out["kill"], out["kill"]  # the scheduler saw the new node's CPUs before the job ended
    assert out["kill"]["complete_before_join"] < fh.N_INPUTS  # the node joined while work was left
    assert out["worker"] in s["nodes"] and out["head"] in s["nodes"], (s, out["kill"])  # it grew onto the node
    assert {a["node"] for a in actors} == {out["head"][:8], out["worker"][:8]}, actors  # an actor on each node
    assert s["pool"]["min_size"] == 1 and s["pool"]["max_size"] == 2
    counts = fh.check_against_reference(fault_bucket.fs, f"{fault_bucket.name}/grow", reference.ref)
    assert counts == {"ok": fh.N_INPUTS}


def test_s3_server_restarted(fault_bucket, reference, ray_local) -> None:  # type: ignore[no-untyped-def]
    """Stop the S3 server twice mid-job (down 3 s each, then restarted on the same port and data): botocore's
    retries (storage.max_attempts = 10, standard mode) ride it out; every image ends ok and identical."""
    from pipeline.execution import run_job

    server = fault_bucket.server
    out = f"{fault_bucket.name}/s3_restart"

    def some_done() -> bool:  # a cube's completion marker exists: the job is well under way
        return bool(fh.complete_groups_local(server.root / out / "cubes.zarr"))

    def restart() -> str:
        server.restart(down_for=3.0)
        return "restarted"

    killer = _Killer(restart, times=2, every=3.0, ready=some_done)
    killer.start()
    t0 = time.perf_counter()
    try:
        summary = run_job(_spec(fault_bucket, "s3_restart"))
    finally:
        killer.stop.set()
        killer.join()
        server.start()
    elapsed = time.perf_counter() - t0
    print(
        f"\n[figures] S3 restarts: {len(killer.log)} outages of 3 s at {[t for t, _ in killer.log]} s; {elapsed:.1f} s vs {reference.elapsed:.1f} s clean; ok={summary.ok} failed={summary.failed}"
    )
    assert len(killer.log) == 2
    counts = fh.check_against_reference(fault_bucket.fs, out, reference.ref)
    assert counts == {"ok": fh.N_INPUTS}, [
        (r["input"], r["error"]) for r in fh.read_rows(fault_bucket.fs, out) if r["status"] != "ok"
    ]


def test_driver_killed_then_resumed(fault_bucket, reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the CLI driver (with its own local Ray, in a PID namespace so Ray dies with it) once some
    cubes are complete, then run the same command again: the complete groups are skipped (same source hash
    and job fingerprint), the rest are redone; the final manifest accounts for every input and every cube
    is identical to the fault-free run's."""
    import subprocess

    server = fault_bucket.server
    spec = _spec(fault_bucket, "driver_kill")
    (tmp_path / "job.toml").write_text(spec.to_toml())
    cli = f"{fh.PYTHON} -m pipeline.cli run --spec {tmp_path / 'job.toml'} --num-cpus 2 --no-progress"
    # The killed driver leaves its lease (issue 12); it runs in another PID namespace, so the rerun cannot
    # see that its process is gone, and waits (--wait) for the lease to expire, made short here.
    env = fh.ray_env(server.env()) | {"DRCR_LEASE_TTL_S": "15"}
    cubes_dir = server.root / fault_bucket.name / "driver_kill" / "cubes.zarr"

    t0 = time.perf_counter()
    first = subprocess.Popen(
        fh.isolated(cli, net=False), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        while len(fh.complete_groups_local(cubes_dir)) < 8:
            assert first.poll() is None, first.communicate()
            assert time.perf_counter() - t0 < 90
            time.sleep(0.1)
        driver = int(Path(f"/proc/{first.pid}/task/{first.pid}/children").read_text().split()[0])
        os.kill(driver, signal.SIGKILL)  # PID 1 of the namespace: the kernel ends its Ray with it
        out1, err1 = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = time.perf_counter() - t0
    done_before = fh.complete_groups_local(cubes_dir)
    assert 8 <= len(done_before) < fh.N_INPUTS
    assert not (
        fault_bucket.fs.invalidate_cache()
        or fault_bucket.fs.exists(f"{fault_bucket.name}/driver_kill/manifest/manifest.parquet")
    )

    t1 = time.perf_counter()
    second = subprocess.run(
        fh.isolated(f"{cli} --wait", net=False), env=env, capture_output=True, text=True, timeout=150
    )
    rerun = time.perf_counter() - t1
    assert second.returncode == 0, second.stderr[-3000:]
    print(
        f"\n[figures] driver kill: killed at {killed_at:.1f} s with {len(done_before)} cubes complete; rerun {rerun:.1f} s; clean {reference.elapsed:.1f} s (in-process Ray)"
    )
    counts = fh.check_against_reference(
        fault_bucket.fs, f"{fault_bucket.name}/driver_kill", reference.ref, allow_skipped_complete=True
    )
    rows = fh.read_rows(fault_bucket.fs, f"{fault_bucket.name}/driver_kill")
    assert {r["group"] for r in rows if r["status"] == "skipped"} == done_before  # complete groups are not redone
    assert counts == {"ok": fh.N_INPUTS - len(done_before), "skipped": len(done_before)}
    for text in (out1, err1, second.stdout, second.stderr):
        assert server.secret not in text and server.key not in text


def test_poison_batch_fails_its_image_and_a_rerun_redoes_it(fault_bucket, reference, ray_local) -> None:  # type: ignore[no-untyped-def]
    """A batch that kills its actor every time it starts (a "poison batch", e.g. a tile that OOMs its worker):
    after MAX_BATCH_ATTEMPTS = 4 starts (the first and 3 retries), each struck, its next start fails it without
    running. Its image is recorded ``failed`` (no completion marker), the job goes on; running the job again
    redoes exactly the failed images."""
    import json
    import tempfile

    from pipeline.execution import run_job
    from pipeline.predict import MAX_BATCH_ATTEMPTS

    me = os.getpid()
    out = f"{fault_bucket.name}/poison"
    # Each batch in flight has a file there that grows by a byte per start (pipeline.predict.BatchAttempts).
    # The poison batch is the first one struck; the actor is killed again each time that batch starts again.
    # (Killing the restarted actor as soon as it runs any call struck later batches of the retried block once
    # the earlier ones finished before the kill landed: then no batch reached 5 starts.)
    starts = Path(tempfile.gettempdir()) / "drcr-batch-attempts"
    poison: dict[str, Any] = {}

    def run_files() -> list[Path]:
        root = fault_bucket.server.root / out / "cubes.zarr" / "zarr.json"
        run_id = json.loads(root.read_text())["attributes"]["drcr_pipeline_run"]["run_id"]
        return sorted(starts.glob(f"{run_id}.*"))

    killed: set[int] = set()
    actor: list[int] = []
    title = fh.PREDICT_TITLE.rsplit(".", 1)[0]  # the actor, idle or running a call

    def actor_pids() -> list[int]:
        # Cached: a scan of /proc takes longer than a batch on the loaded box, the strike must not wait for it.
        if not [p for p in actor if fh.proc_title(p).startswith(title)]:
            actor[:] = [p for p in fh.pids_with_title(title) if fh.is_descendant(p, me) and p not in killed]
        return list(actor)

    def kill() -> list[int] | None:
        pids = actor_pids()
        if not pids:
            return None
        if "file" not in poison:
            files = run_files()
            target = files[0] if files else None
        else:
            target = poison["file"]
        try:
            size = target.stat().st_size if target else 0
        except FileNotFoundError:
            return None
        if not size or size <= poison.get("struck", 0):
            return None  # not started again since the last kill
        if not fh.sigkill(pids):
            return None
        killed.update(pids)
        actor.clear()
        if not target.exists():  # it had just finished: the kill struck another batch; not a strike on this one
            poison.clear()
            return None
        poison.update(file=target, struck=size)
        return pids

    killer = _Killer(
        kill,
        times=MAX_BATCH_ATTEMPTS + 1,  # one more than can land: the batch must not run a 5th time
        every=0.0,
        ready=lambda: bool(fh.complete_groups_local(fault_bucket.server.root / out / "cubes.zarr")),
    )
    killer.start()
    try:
        first = run_job(_spec(fault_bucket, "poison"))
    finally:
        killer.stop.set()
        killer.join()
    rows = fh.read_rows(fault_bucket.fs, out)
    failed = {r["input"] for r in rows if r["status"] == "failed"}
    # MAX_BATCH_ATTEMPTS strikes; one more when it lands on the start that already fails the batch, before the
    # failed record is sent (the retry of that start fails it again).
    assert MAX_BATCH_ATTEMPTS <= len(killer.log) <= MAX_BATCH_ATTEMPTS + 1 and 1 <= len(failed) <= 2, [
        (r["input"], r["error"]) for r in rows if r["status"] != "ok"
    ]
    assert all(r["error_type"] == "InferenceError" for r in rows if r["status"] == "failed")
    fh.check_against_reference(fault_bucket.fs, out, reference.ref)  # the ok ones are right, the failed unmarked
    t0 = time.perf_counter()
    again = run_job(_spec(fault_bucket, "poison"))
    print(
        f"\n[figures] poison batch: {len(killer.log)} kills of its starts -> ok={first.ok} failed={first.failed}; "
        f"rerun {time.perf_counter() - t0:.1f} s: ok={again.ok} skipped={again.skipped}"
    )
    counts = fh.check_against_reference(fault_bucket.fs, out, reference.ref, allow_skipped_complete=True)
    assert counts == {"ok": len(failed), "skipped": fh.N_INPUTS - len(failed)}
    assert {r["input"] for r in fh.read_rows(fault_bucket.fs, out) if r["status"] == "ok"} == failed
