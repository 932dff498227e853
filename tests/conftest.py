"""Session fixtures shared by the test suite: a real local S3 server and a real local Ray.

- ``s3_server`` (session): :class:`s3server.S3Server` on 127.0.0.1 (rclone serve s3, moto as fallback).
- ``s3_bucket`` (function): a fresh, empty bucket on that server, as :class:`S3Bucket`.
- ``ray_local`` (session): ``ray.init`` on this machine, every address 127.0.0.1; shut down at the end.

Only integration tests (``@pytest.mark.integration``) should use them.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ray_constants is imported; with "0" it treats
# this machine as a single-node local cluster and resolves "127.0.0.1" to loopback instead of the host's
# routable address (services.resolve_ip_for_localhost). Set before any test module imports ray, and
# inherited by subprocesses (CLI runs) too.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# tests/ holds helper modules (s3server.py) that are not a package, and benchmarks/ the stand-in predictors
# (standin.py) some tests inject; make them importable however pytest was started (rootdir, an IDE,
# `python -m pytest tests/unit/...`).
_TESTS_DIR = str(Path(__file__).resolve().parent)
for _dir in (str(Path(_TESTS_DIR).parent / "benchmarks"), _TESTS_DIR):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)

from s3server import S3Server  # noqa: E402


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the session's S3 server.

    ``url`` is ``"s3://<name>"``; ``storage_options`` are s3fs options for ``pipeline.storage.open_fs``;
    ``env`` is the standard AWS environment for subprocesses. Unpacks as ``url, storage_options``.
    """

    url: str
    name: str
    storage_options: dict[str, Any] = field(repr=False)
    env: dict[str, str] = field(repr=False)
    server: S3Server = field(repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.url, self.storage_options))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running S3-compatible server on 127.0.0.1 (free port), objects stored in a session temp dir."""
    server = S3Server(tmp_path_factory.mktemp("s3data") / "root")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A fresh, empty bucket (``s3://test-<hex>``) with the storage options that reach it."""
    if not s3_server.is_running:  # a previous test stopped it (restart tests) and failed before restarting
        s3_server.start()
    name = f"test-{uuid.uuid4().hex[:12]}"
    url = s3_server.create_bucket(name)
    return S3Bucket(
        url=url, name=name, storage_options=s3_server.storage_options(), env=s3_server.env(), server=s3_server
    )


@pytest.fixture(scope="session")
def ray_local(s3_server: S3Server) -> Iterator[Any]:
    """A real local Ray (2 CPUs, no dashboard) bound to 127.0.0.1; yields the ``ray`` module.

    Ray reads these variables in the driver and in every worker it starts, so they are set in
    ``os.environ`` before ``ray`` is imported / ``ray.init`` runs, and inherited by the workers:
    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (set at conftest import): single-node local mode, where
      ``_node_ip_address="127.0.0.1"`` stays loopback instead of being resolved to the host's address.
    - ``RAY_AUTH_MODE``: ray >= 2.5x turns token auth on by default for a new local cluster and writes a
      token to ~/.ray; tests run "disabled" unless the caller set a mode, so driver and workers agree.
    """
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "ray was imported before tests/conftest.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; "
            "export it in the environment that starts pytest"
        )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats prompt or upload attempt
    # Workers inherit the environment at ray.init: give them the S3 server's standard AWS variables, as a
    # cluster's pods get them from a Secret, so job specs can name the variables (key_env/secret_env).
    os.environ.update(s3_server.env())
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # keep every Ray socket on loopback; the test machine has no network
        log_to_driver=True,
    )
    try:
        addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        if addresses != {"127.0.0.1"}:
            raise RuntimeError(f"local Ray bound to {sorted(addresses)}, expected only 127.0.0.1")
        yield ray
    finally:
        ray.shutdown()
