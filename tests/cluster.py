"""A real multi-process Ray cluster on one machine, made with ``ray start``, for the integration tests.

Two layers:

- :class:`LocalCluster`: a head (``ray start --head``, optionally with the dashboard and its job server)
  plus worker nodes (``ray start --address``), every socket on 127.0.0.1. Stopped with ``ray stop --force``,
  which kills every Ray process *it can see*, so use it only inside its own PID namespace.
- :func:`isolated_command`: the argv that runs ``python tests/cluster.py [options] -- CMD ...`` in new
  network, PID and mount namespaces (only ``lo`` up; own ``/proc``). There this module's ``main`` starts
  the cluster, waits until every node is alive, runs ``CMD`` with ``RAY_ADDRESS`` and
  ``RAY_API_SERVER_ADDRESS`` set, stops the cluster and exits with ``CMD``'s status. The shell ``exec``s
  python, so it is the namespace's PID 1: if the test kills it (timeout), the kernel kills every process
  left in the namespace, so no Ray process outlives a test and no other Ray on the machine is touched.

Why a namespace: a second node must be reached by address, and on a host with a routable interface Ray's
multi-node mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset or 1) advertises and dials that interface; in a
namespace whose only interface is ``lo`` every address is loopback, and nothing is reachable from outside.
Needs root (or unprivileged user namespaces) and util-linux ``unshare``.

By hand (as root)::

    unshare -n -p -f -m --mount-proc --kill-child sh -c 'ip link set lo up; exec python tests/cluster.py \\
        --head-cpus 1 --node-cpus 1 -- drcr-pipeline run --spec jobs/demo.toml --set ray.actors=2'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ray_env(*, multi_node: bool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every process of the cluster (and its drivers) gets.

    - ``RAY_AUTH_MODE=disabled`` in every process: ray >= 2.5x turns token auth on for a new cluster, and a
      node or driver started with another mode cannot join.
    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: "0" (single-host mode, 127.0.0.1 stays loopback) for a head
      alone; "1" with worker nodes, because ``ray start --address`` refuses to run in single-host mode.
    - no inherited ``RAY_ADDRESS``: the caller's (the test session's local Ray) is not this cluster.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multi_node else "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            # The venv's scripts (ray, drcr-pipeline) for job entrypoints run by the job supervisor.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    env.update(extra or {})
    return env


class LocalCluster:
    """A Ray head plus worker nodes started with ``ray start`` on 127.0.0.1. Use in a PID namespace.

    Args:
        head_cpus: ``--num-cpus`` of the head.
        node_cpus: ``--num-cpus`` of each worker node (one node per entry).
        dashboard: start the dashboard (and the Ray Jobs server) on a free port; ~900 MB of memory.
        object_store_mb: ``--object-store-memory`` of every node, in MiB (the default, 30 % of RAM per node,
            does not fit /dev/shm twice on a small machine).
        temp_dir: Ray's session root; a new short directory under /tmp when None (Unix socket paths
            under it must stay below 108 bytes, which pytest's tmp_path can exceed).
        env: extra environment for every Ray process.
    """

    def __init__(
        self,
        *,
        head_cpus: int = 1,
        node_cpus: Sequence[int] = (),
        dashboard: bool = False,
        object_store_mb: int = 256,
        temp_dir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.head_cpus = head_cpus
        self.node_cpus = list(node_cpus)
        self.dashboard = dashboard
        self.object_store_mb = object_store_mb
        self._own_temp = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        self.env = ray_env(multi_node=bool(self.node_cpus), extra=env)
        self.port = free_port()
        self.dashboard_port = free_port() if dashboard else 0
        self.ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"

    @property
    def address(self) -> str:
        """The GCS address drivers and nodes join (``RAY_ADDRESS``)."""
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The Ray Jobs API address (``ray job submit --address``, ``JobSubmissionClient``)."""
        if not self.dashboard:
            raise RuntimeError("this cluster was started without the dashboard (dashboard=False)")
        return f"http://{HOST}:{self.dashboard_port}"

    def _common(self, cpus: int) -> list[str]:
        return [
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--node-ip-address={HOST}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
        ]

    def _ray_start(self, args: list[str]) -> None:
        proc = subprocess.run([self.ray, "start", *args], env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def start(self, timeout: float = 180.0) -> LocalCluster:
        """Start the head and every worker node, and wait until all of them are alive; returns self."""
        head = ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", *self._common(self.head_cpus)]
        if self.dashboard:
            head += [f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true"]
        else:
            head += ["--include-dashboard=false"]
        self._ray_start(head)
        for cpus in self.node_cpus:
            # Every node here shares one loopback: the per-node agents' fixed default ports (dashboard agent
            # 52365, ...) would collide with the head's, so each worker node gets free ones.
            ports = (
                "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port",
                "--metrics-export-port",
                "--runtime-env-agent-port",
            )
            self._ray_start([f"--address={self.address}", *self._common(cpus), *(f"{p}={free_port()}" for p in ports)])
        self.wait_for_nodes(1 + len(self.node_cpus), timeout)
        if self.dashboard:
            self._wait_http(f"{self.dashboard_url}/api/version", timeout)
        return self

    def wait_for_nodes(self, n: int, timeout: float) -> list[dict]:  # type: ignore[type-arg]
        """Wait until ``n`` nodes are alive (asked in a short-lived driver process); returns their records."""
        code = (
            "import json, ray; ray.init(log_to_driver=False); "  # RAY_ADDRESS from the environment
            "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'cpus': n['Resources'].get('CPU', 0)} "
            "for n in ray.nodes() if n['Alive']]))"
        )
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(
                [sys.executable, "-c", code], env=self.command_env(), capture_output=True, text=True, timeout=timeout
            )
            nodes = (
                json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else []
            )
            if len(nodes) >= n:
                return nodes  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {n} Ray nodes alive after {timeout:.0f} s:\n{proc.stderr[-2000:]}")
            time.sleep(1)

    @staticmethod
    def _wait_http(url: str, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
            time.sleep(0.5)

    def command_env(self) -> dict[str, str]:
        """Environment for a command run against this cluster (driver, ``ray job submit``)."""
        extra = {"RAY_ADDRESS": self.address}
        if self.dashboard:
            extra["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        return self.env | extra

    def stop(self) -> None:
        """``ray stop --force``: kills every Ray process visible here, so only inside this PID namespace.

        ``ray start`` daemonises, so the killed processes are children of the namespace's PID 1 (python,
        which does not reap them); ``ray stop`` would wait its whole grace period on their zombies. The
        kernel reaps them when PID 1 exits, so a short grace period loses nothing.
        """
        subprocess.run([self.ray, "stop", "--force", "--grace-period=1"], env=self.env, capture_output=True, timeout=60)
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def namespaced(cmd: Sequence[str]) -> list[str]:
    """``cmd`` in new network (only ``lo`` up), PID and mount namespaces; the command is the namespace's PID 1."""
    if shutil.which("unshare") is None:
        raise RuntimeError("util-linux `unshare` not found")
    line = "ip link set lo up 2>/dev/null || ifconfig lo up; exec " + shlex.join(cmd)
    return ["unshare", "-n", "-p", "-f", "-m", "--mount-proc", "--kill-child", "sh", "-c", line]


def can_isolate() -> bool:
    """Whether :func:`namespaced` works here (root or unprivileged user namespaces, and ``unshare``)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(namespaced(["true"]), capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def isolated_command(
    cmd: Sequence[str], *, head_cpus: int = 1, node_cpus: Sequence[int] = (), dashboard: bool = False
) -> list[str]:
    """The argv running ``cmd`` against a fresh :class:`LocalCluster` inside its own namespaces."""
    opts = [f"--head-cpus={head_cpus}", *(f"--node-cpus={c}" for c in node_cpus)] + (
        ["--dashboard"] if dashboard else []
    )
    return namespaced([sys.executable, str(Path(__file__).resolve()), *opts, "--", *cmd])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Start a local Ray cluster, run a command against it, stop it (use inside `unshare`)."
    )
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument(
        "--node-cpus", type=int, action="append", default=[], help="add a worker node with this many CPUs (repeatable)"
    )
    p.add_argument("--dashboard", action="store_true", help="start the dashboard / Ray Jobs server")
    p.add_argument(
        "cmd", nargs=argparse.REMAINDER, help="-- command to run with RAY_ADDRESS (and RAY_API_SERVER_ADDRESS) set"
    )
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given after --")
    cluster = LocalCluster(head_cpus=args.head_cpus, node_cpus=args.node_cpus, dashboard=args.dashboard)
    t0 = time.monotonic()
    try:
        cluster.start()
        print(
            f"[cluster] {1 + len(args.node_cpus)} node(s) at {cluster.address} up in {time.monotonic() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        return subprocess.run(cmd, env=cluster.command_env()).returncode
    finally:
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
