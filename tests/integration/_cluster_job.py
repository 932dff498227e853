"""Run one job on a two-node local Ray cluster and SIGKILL the worker node mid-job (issue 5, fault b).

Meant to run as PID 1 of its own network + PID namespace (``_fault_helpers.isolated(..., net=True)``): only
``lo`` is up, so the host's S3 server is out of reach and a second ``rclone serve s3`` is started here on the
same data directory (same bucket, same objects). Then a head node (``ray start --head``) and a worker node
(``ray start --address ... --block`` in its own process group) start; this process is the job's driver. A
thread waits until the worker node runs an inference batch, then kills the worker node's whole process group
(raylet, agents, its actor and task workers). When this process exits, the kernel ends every other process of
the namespace.

With ``PARAMS["join"]`` the worker node is not there when the job starts: a thread starts it as the job
starts (a node start takes tens of seconds on a loaded box; started any later it joined as the last inputs
ran out), records when the scheduler sees its CPUs and how many cubes were complete then; the elastic pool
must grow onto it. Nothing is killed.

Usage: ``python _cluster_job.py PARAMS.json``; writes ``PARAMS["result"]`` (JSON).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import _fault_helpers as fh  # noqa: E402
from s3server import S3Server, free_port  # noqa: E402


def main() -> None:
    params = json.loads(Path(sys.argv[1]).read_text())
    server = S3Server(params["s3_root"], key=params["key"], secret=params["secret"]).start()
    os.environ.update(server.env())
    # The GCS declares a node dead after failure_threshold missed health checks; defaults (3 s × 5) would make
    # the test wait ~15 s for the restart. Spread threshold 0: place each actor on the least-loaded node, so one
    # of the two actors runs on the worker node.
    os.environ.update(
        {
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_timeout_ms": "500",
            "RAY_scheduler_spread_threshold": "0",
        }
    )
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={params.get('head_cpus', 3)}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    worker_log = open(Path(params["result"]).with_suffix(".worker.log"), "wb")  # noqa: SIM115 - lives as long as the node

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [ray_bin, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--num-cpus={params.get('worker_cpus', 2)}", "--block", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=worker_log,
        )  # fmt: skip

    import ray

    from pipeline.config import JobSpec
    from pipeline.execution import run_job

    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
    head_id = ray.get_runtime_context().get_node_id()
    log: dict[str, object] = {}
    stop = threading.Event()
    joiner = threading.Thread(target=_join, args=(params, start_worker, log, stop), daemon=True)
    if params.get("join"):
        worker = None
    else:
        worker = start_worker()
        _wait_nodes(ray, 2)

    def on_worker(title: str) -> list[int]:
        assert worker is not None
        return [p for p in fh.pids_with_title(title) if fh.is_descendant(p, worker.pid)]

    def killer() -> None:
        t0 = time.perf_counter()
        while not stop.is_set() and not on_worker(fh.PREDICT_TITLE):
            stop.wait(0.05)
        # Ray Data returns an actor task's records when the task (a block: one image's batches) ends, so a
        # worker that is computing may have returned nothing yet: wait until a cube it wrote is complete.
        worker_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head_id)
        out = Path(params["s3_root"]) / params["spec"]["output"].removeprefix("s3://") / "cubes.zarr"
        while not stop.is_set() and not _completed_on(out, worker_id):
            stop.wait(0.2)
        log["worker_cube_complete_s"] = round(time.perf_counter() - t0, 2)
        stop.wait(params["kill_after"])
        while not stop.is_set() and not on_worker(fh.PREDICT_TITLE):  # strike mid-batch
            stop.wait(0.01)
        if stop.is_set():
            return
        log["busy_actor_on_worker"] = True
        # The node's processes: `ray start --block` and everything under it (raylet, agents, and the raylet's
        # workers, which Ray puts in process groups of their own). Kill them all at once, as a machine dies.
        node = [int(p) for p in os.listdir("/proc") if p.isdigit() and fh.is_descendant(int(p), worker.pid)]
        groups = {g for g in map(_pgid, node) if g is not None and g > 1}
        for g in groups:
            os.killpg(g, signal.SIGKILL)
        log["processes_killed"] = fh.sigkill(node) + 0
        log["process_groups"] = len(groups)
        log["killed_at_s"] = round(time.perf_counter() - t0, 2)

    decisions = _trace_autoscaler(t_start := time.perf_counter())
    diag = threading.Thread(
        target=_diagnose, args=(Path(params["result"]).with_suffix(".diag.json"), decisions, stop), daemon=True
    )
    diag.start()
    thread = threading.Thread(target=killer, daemon=True)
    if params.get("kill"):
        thread.start()
    t0 = time.perf_counter()
    if params.get("join"):
        joiner.start()
    summary = run_job(
        JobSpec.from_dict(
            params["spec"] | {"storage": params["spec"]["storage"] | {"endpoint_url": server.endpoint_url}}
        )
    )
    elapsed = time.perf_counter() - t0
    stop.set()
    worker_id = next((n["NodeID"] for n in ray.nodes() if n["NodeID"] != head_id), None)
    nodes_alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    # Evidence for the RELIABILITY figures: where Ray Data's pool actors ran, and what its autoscaler decided.
    log["actors"] = [a for a in _actors() if "MapWorker" in a["class"]]
    log["autoscaler"] = decisions
    log["t_run_start"] = round(t0 - t_start, 2)
    Path(params["result"]).write_text(
        json.dumps(
            {
                "summary": summary.to_dict(),
                "elapsed_s": elapsed,
                "kill": log,
                "head": head_id,
                "worker": worker_id,
                "alive_after": nodes_alive,
            }
        )
    )
    ray.shutdown()
    server.stop()


def _completed_on(cubes: Path, node_id: str) -> bool:
    """Whether a complete group's provenance names ``node_id`` among its workers (``node:<id>``)."""
    for group in fh.complete_groups_local(cubes):
        try:
            if f"node:{node_id}" in (cubes / group / "zarr.json").read_text():
                return True
        except OSError:
            continue
    return False


def _actors() -> list[dict[str, object]]:
    """Every actor as the GCS knows it: class, node (8 hex digits), state, restarts. (Ray's state API needs
    the dashboard, which this cluster runs without; the GCS table is what it reads from.)"""
    from ray._private import state

    return [
        {"class": a.get("ActorClassName") or "", "node": (a.get("Address", {}).get("NodeID") or "")[:8],
         "state": a.get("State"), "restarts": a.get("NumRestarts")}
        for a in state.actors().values()
    ]  # fmt: skip


def _diagnose(path: Path, decisions: list[list[object]], stop: threading.Event, every: float = 30.0) -> None:
    """Every ``every`` s, write the nodes, free resources, actors and the autoscaler's decisions so far to
    ``path``: when a job hangs, the test prints it."""
    import ray

    t0 = time.perf_counter()
    while not stop.wait(every):
        try:
            state = {
                "t_s": round(time.perf_counter() - t0, 1),
                "nodes": [
                    {"id": n["NodeID"][:8], "alive": n["Alive"], "cpu": n["Resources"].get("CPU")} for n in ray.nodes()
                ],
                "available": ray.available_resources(),
                "actors": _actors(),
                "autoscaler": decisions[-20:],
            }
            path.write_text(json.dumps(state, indent=1, default=str))
        except Exception as exc:  # noqa: BLE001 - diagnostics must never break the job
            path.write_text(json.dumps({"error": repr(exc)}))


def _trace_autoscaler(t0: float) -> list[list[object]]:
    """Record Ray Data's actor-pool scaling decisions (time, pool size, delta, reason), each change of reason
    once: the driver runs the autoscaler, so wrapping its decision function here sees every one."""
    import re

    from ray.data._internal.actor_autoscaler import default_actor_autoscaler as das

    out: list[list[object]] = []
    inner = das.DefaultActorAutoscaler._derive_target_scaling_config

    def traced(self, actor_pool, op, op_state):  # type: ignore[no-untyped-def]
        req = inner(self, actor_pool, op, op_state)
        reason = re.sub(r"[0-9.]+", "#", req.reason or "")
        if not out or out[-1][3] != reason or out[-1][1] != actor_pool.current_size():
            out.append([round(time.perf_counter() - t0, 2), actor_pool.current_size(), req.delta, reason])
        return req

    das.DefaultActorAutoscaler._derive_target_scaling_config = traced  # type: ignore[method-assign]
    return out


def _wait_nodes(ray: object, n: int, timeout: float = 180.0) -> None:
    """Wait for ``n`` alive nodes whose CPUs are all free: the scheduler has seen the new node's resources (on
    a loaded box that lags its registration, and an actor pool started before then lands on the head)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [x for x in ray.nodes() if x["Alive"]]  # type: ignore[attr-defined]
        cpus = sum(x["Resources"].get("CPU", 0) for x in alive)
        if len(alive) >= n and ray.available_resources().get("CPU", 0) >= cpus:  # type: ignore[attr-defined]
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the worker node did not join")
        time.sleep(0.2)


def _join(params: dict, start_worker: object, log: dict, stop: threading.Event) -> None:  # type: ignore[type-arg]
    """Start the worker node now (the job is starting) and wait until the scheduler sees its CPUs; record when
    (``joined_s``, from the job's start) and how many cubes were complete by then (``complete_before_join``)."""
    import ray

    out = Path(params["s3_root"]) / params["spec"]["output"].removeprefix("s3://") / "cubes.zarr"
    t0 = time.perf_counter()
    want = params.get("head_cpus", 3) + params.get("worker_cpus", 2)
    # `ray start` gives up if its raylet has not registered within 30 s (Ray's own constant), which a loaded
    # 2-core box can exceed: start it again then.
    for attempt in range(3):
        log["join_attempts"] = attempt + 1
        node = start_worker()  # type: ignore[operator]
        while not stop.is_set() and node.poll() is None:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= 2 and ray.cluster_resources().get("CPU", 0) >= want:
                log["joined_s"] = round(time.perf_counter() - t0, 2)
                log["complete_before_join"] = len(fh.complete_groups_local(out))
                return
            stop.wait(0.2)
        if stop.is_set():
            return


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


if __name__ == "__main__":
    main()
