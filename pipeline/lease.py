"""One run per output: a lease object ``<output>/lease.json`` taken at start, renewed, released at the end.

The lease holds the run id, host, pid, heartbeat and expiry (JSON). Taking it:

1. read it: held by another run and not expired → :class:`LeaseHeldError` naming the holder (or wait,
   with ``wait_s``); expired → it is taken over;
2. write ours, conditionally where the store can (local files: ``O_CREAT | O_EXCL``; S3: ``If-None-Match: *``
   through s3fs ``mode="create"``, which AWS S3 honours and servers such as ``rclone serve s3`` ignore);
3. wait ``settle_s`` and read it back: the last writer wins, so when two runs raced past step 1 on a store
   that ignores the condition, exactly one reads its own record back, the other backs off.

A thread renews the heartbeat every ``ttl_s / 3``; if it finds the lease in another run's hands (this run
stalled past its expiry and was taken over) it sets :attr:`Lease.lost`. Overlapping scheduled firings are
therefore safe: the later one is refused (or waits), and a run that lost its lease stops marking cubes
complete (``pipeline.cubes.mark_complete`` also refuses a group whose record names another run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage
from pipeline.errors import PipelineError, StorageError

__all__ = ["LEASE_PATH", "LeaseHeldError", "LeaseRecord", "Lease", "hold_lease", "read_lease"]

log = logging.getLogger(__name__)

LEASE_PATH = "lease.json"
TTL_S = float(os.environ.get("DRCR_LEASE_TTL_S", "120"))
"""A lease not renewed for this long is expired and may be taken over (heartbeat every ``TTL_S / 3``);
``DRCR_LEASE_TTL_S`` overrides it (tests that kill a driver and rerun at once)."""
SETTLE_S = 1.0
"""Seconds between writing the lease and reading it back (longer than a PUT takes to become visible)."""


class LeaseHeldError(PipelineError, RuntimeError):
    """Another run holds the output's lease."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    expires: float
    machine: str = ""
    """Boot id and PID namespace of the holder: where they equal ours, its pid can be checked for life."""

    def describe(self) -> str:
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.heartbeat))
        left = self.expires - time.time()
        return f"run {self.run_id} on {self.host} (pid {self.pid}), last heartbeat {iso}, expires in {left:.0f} s"


def _machine() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _gone(record: LeaseRecord) -> bool:
    """The holder ran in this very PID namespace of this boot, and its process no longer exists (a
    driver killed outright): its lease need not be waited out."""
    if not record.machine or record.machine != _machine() or record.host != socket.gethostname():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lease_path(output: str, storage_options: Mapping[str, Any] | None) -> tuple[AbstractFileSystem, str]:
    return storage.open_fs(storage.join(output, LEASE_PATH), storage_options)


def read_lease(output: str, storage_options: Mapping[str, Any] | None = None) -> LeaseRecord | None:
    """The current lease record, or ``None`` when there is none (or it is unreadable: treated as absent)."""
    fs, path = _lease_path(output, storage_options)
    return _read(fs, path)


def _read(fs: AbstractFileSystem, path: str) -> LeaseRecord | None:
    try:
        data = storage.read_bytes(fs, path)
    except FileNotFoundError:
        return None
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError):
        log.warning("lease %s is unreadable; treating it as expired", storage.redact(path))
        return None


def _create(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` only if nothing is at ``path``, where the store can tell; False if something was."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        with storage.storage_errors(f"create {path}"):
            fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except TypeError:  # a filesystem without exclusive create: the read-back check decides
        storage.write_bytes(fs, path, data)
    except StorageError as exc:
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    return True


class Lease:
    """A held lease; use :func:`hold_lease`. ``lost`` turns true if another run took it over."""

    def __init__(self, fs: AbstractFileSystem, path: str, record: LeaseRecord, ttl_s: float) -> None:
        self.fs, self.path, self.record, self.ttl_s = fs, path, record, ttl_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def renew(self) -> bool:
        """Push the expiry forward; False (and ``lost``) if the lease is no longer ours."""
        current = _read(self.fs, self.path)
        if current is None or current.run_id != self.run_id:
            self.lost = True
            log.error("lease on %s lost to %s", storage.redact(self.path), current.describe() if current else "nobody")
            return False
        now = time.time()
        self.record = dataclasses.replace(self.record, heartbeat=now, expires=now + self.ttl_s)
        storage.write_bytes(self.fs, self.path, _encode(self.record))
        return True

    def check(self) -> None:
        """Raise :class:`LeaseHeldError` if another run took the lease over (see :attr:`lost`)."""
        if self.lost or not self.renew():
            holder = _read(self.fs, self.path)
            raise LeaseHeldError(
                f"run {self.run_id} lost the output's lease to {holder.describe() if holder else 'nobody'} "
                "(it stalled past its expiry); its results are not recorded"
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except OSError as exc:  # storage briefly unreachable: try again at the next beat
                log.warning("lease heartbeat failed: %s", storage.describe_error(exc))

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        current = _read(self.fs, self.path)
        if current is not None and current.run_id == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(dataclasses.asdict(record), sort_keys=True).encode()


def acquire(
    output: str,
    run_id: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    ttl_s: float = TTL_S,
    wait_s: float = 0.0,
    settle_s: float = SETTLE_S,
    poll_s: float = 5.0,
) -> Lease:
    """Take the output's lease for ``run_id`` (see the module doc); waits up to ``wait_s`` for a holder.

    Raises:
        LeaseHeldError: another run holds it (after waiting ``wait_s``); the message names the holder.
    """
    fs, path = _lease_path(output, storage_options)
    deadline = time.monotonic() + wait_s
    while True:
        holder = _try_take(fs, path, run_id, ttl_s, settle_s)
        if holder is None:
            break
        if time.monotonic() >= deadline:
            raise LeaseHeldError(
                f"output {storage.redact(output)!r} is in use by {holder.describe()}; "
                "wait for it (--wait) or, if that run is gone, retry once its lease expires"
            )
        log.info("output in use by %s; waiting", holder.describe())
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())) or poll_s)
    now = time.time()
    lease = Lease(fs, path, LeaseRecord(**json.loads(storage.read_bytes(fs, path))), ttl_s)
    lease.record = dataclasses.replace(lease.record, heartbeat=now)
    lease._thread.start()
    return lease


def _try_take(fs: AbstractFileSystem, path: str, run_id: str, ttl_s: float, settle_s: float) -> LeaseRecord | None:
    """One attempt: ``None`` when the lease is now ours, else the record of the run that holds it."""
    now = time.time()
    ours = LeaseRecord(
        run_id=run_id,
        host=socket.gethostname(),
        pid=os.getpid(),
        started=now,
        heartbeat=now,
        expires=now + ttl_s,
        machine=_machine(),
    )
    current = _read(fs, path)
    if current is not None and current.run_id != run_id and current.expires > now and not _gone(current):
        return current
    if current is None:
        if not _create(fs, path, _encode(ours)):
            return _read(fs, path) or ours
    else:
        log.warning("taking over the expired (or orphaned) lease of %s", current.describe())
        storage.write_bytes(fs, path, _encode(ours))
    time.sleep(settle_s)
    back = _read(fs, path)
    if back is not None and back.run_id == run_id:
        return None
    return back or ours


@contextlib.contextmanager
def hold_lease(
    output: str,
    run_id: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    ttl_s: float = TTL_S,
    wait_s: float = 0.0,
    settle_s: float = SETTLE_S,
) -> Iterator[Lease]:
    """Hold the output's lease for the block (heartbeat in a thread), released in ``finally``."""
    lease = acquire(output, run_id, storage_options, ttl_s=ttl_s, wait_s=wait_s, settle_s=settle_s)
    try:
        yield lease
    finally:
        lease.release()
