"""pipeline.storage against a real S3-compatible server (rclone serve s3 on 127.0.0.1)."""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Any

import numpy as np
import pytest
import s3fs

from pipeline.errors import StorageError
from pipeline.storage import (
    describe_error,
    join,
    open_fs,
    open_store,
    read_bytes,
    redact,
    resolve_storage_options,
    safe_options_for_record,
    write_bytes,
)

pytestmark = pytest.mark.integration


def test_write_read_list_ranged(s3_bucket) -> None:
    url, options = s3_bucket
    fs, root = open_fs(url, options)
    payload = bytes(range(256)) * 4
    for name in ("a/one.bin", "a/two.bin", "b/c/three.bin"):
        _, path = open_fs(join(url, name), options)
        write_bytes(fs, path, payload)
    assert sorted(fs.find(root)) == [f"{root}/a/one.bin", f"{root}/a/two.bin", f"{root}/b/c/three.bin"]
    assert sorted(fs.ls(join(root, "a"), detail=False)) == [f"{root}/a/one.bin", f"{root}/a/two.bin"]
    _, path = open_fs(join(url, "a/one.bin"), options)
    assert read_bytes(fs, path) == payload
    assert read_bytes(fs, path, 10, 20) == payload[10:20]
    assert fs.size(path) == len(payload)
    # Overwrite is a whole-object replace.
    write_bytes(fs, path, b"new")
    assert read_bytes(fs, path) == b"new"


def test_multipart_upload(s3_bucket) -> None:
    url, options = s3_bucket
    fs, path = open_fs(join(url, "big.bin"), options)
    data = np.random.default_rng(0).integers(0, 256, 12 * 2**20, dtype=np.uint8).tobytes()
    with fs.open(path, "wb", block_size=5 * 2**20) as f:  # 5 MiB parts: the S3 minimum
        f.write(data)
    assert fs.size(path) == len(data)
    assert read_bytes(fs, path, len(data) - 7, len(data)) == data[-7:]


def test_options_from_spec_reference(s3_bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    server = s3_bucket.server
    monkeypatch.setenv("DRCR_IT_KEY", server.key)
    monkeypatch.setenv("DRCR_IT_SECRET", server.secret)
    ref = {
        "endpoint_url": server.endpoint_url,
        "region": "us-east-1",
        "key_env": "DRCR_IT_KEY",
        "secret_env": "DRCR_IT_SECRET",
        "max_attempts": 3,
    }
    options = resolve_storage_options(ref)
    fs, path = open_fs(join(s3_bucket.url, "ref.txt"), options)
    write_bytes(fs, path, b"via reference")
    assert read_bytes(fs, path) == b"via reference"
    record = safe_options_for_record(options)
    assert record["endpoint_url"] == server.endpoint_url
    assert server.secret not in repr(record) and server.key not in repr(record)


def test_options_from_standard_environment(s3_bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    # fsspec caches filesystems by their arguments; an argument-less one may predate this environment.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs, path = open_fs(join(s3_bucket.url, "env.txt"))
        write_bytes(fs, path, b"via env")
        assert read_bytes(fs, path) == b"via env"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_restart_keeps_data(s3_bucket) -> None:
    url, options = s3_bucket
    fs, path = open_fs(join(url, "persist/x.bin"), options)
    write_bytes(fs, path, b"survives")
    s3_bucket.server.restart()
    assert read_bytes(fs, path) == b"survives"
    assert fs.find(join(s3_bucket.name, "persist")) == [path]


def test_the_server_answers_from_its_files_not_a_stale_listing(s3_bucket) -> None:
    """The test server's directory cache entry outlives the object's file: the next read says what the files
    say (NoSuchKey) within s3fs's retries, as S3's read-after-write consistency would, and never promises
    the old size with no body (``ClientPayloadError: received 0 of 21 bytes`` on every retry, with rclone's
    default 5-minute cache; see ``s3server.RCLONE_CACHE_ARGS``). A file replaced the same way reads as the
    new one."""
    import time

    if s3_bucket.server.backend != "rclone":
        pytest.skip("rclone's directory cache; moto keeps objects in memory")
    url, options = s3_bucket
    on_disk = s3_bucket.server.root / s3_bucket.name / "g/preview/2/c/0/0"
    for name, change, expected in (("gone", None, None), ("replaced", b"b" * 30, b"b" * 30)):
        fs, path = open_fs(join(url, f"g/preview/2/c/0/0/{name}"), options)
        write_bytes(fs, path, b"a" * 21)  # the size of a preview chunk the incremental-runs test once failed on
        assert read_bytes(fs, path) == b"a" * 21  # the server now holds the entry
        if change is None:
            (on_disk / name).unlink()
        else:
            (on_disk / ".tmp").write_bytes(change)
            (on_disk / ".tmp").replace(on_disk / name)
        t0 = time.monotonic()
        if expected is None:
            with pytest.raises(FileNotFoundError):
                read_bytes(fs, path)
        else:
            assert read_bytes(fs, path) == expected
        assert time.monotonic() - t0 < 3, name  # s3fs's 5 quick retries span ~1.9 s


def test_outage_ridden_out_by_client_retries(s3_bucket) -> None:
    """Server down for ~1.5 s while a read is in flight: botocore's retries (not ours) carry it through."""
    url, options = s3_bucket
    fs, path = open_fs(join(url, "outage.bin"), options)
    write_bytes(fs, path, b"still here")
    server = s3_bucket.server
    server.stop()
    restarter = threading.Timer(1.5, server.start)
    restarter.start()
    try:
        fs.invalidate_cache()
        assert read_bytes(fs, path) == b"still here"
    finally:
        restarter.join()
    assert server.is_running


def test_zarr_store_round_trip(s3_bucket) -> None:
    import zarr

    store = open_store(join(s3_bucket.url, "cube.zarr"), s3_bucket.storage_options)
    arr = zarr.create_array(store, shape=(4, 6), chunks=(2, 3), dtype="float32")
    arr[:] = np.arange(24, dtype="float32").reshape(4, 6)
    back = zarr.open_array(open_store(join(s3_bucket.url, "cube.zarr"), s3_bucket.storage_options, read_only=True))
    np.testing.assert_array_equal(back[:], np.arange(24, dtype="float32").reshape(4, 6))


def test_secrets_not_in_repr_or_logs(s3_bucket, caplog: pytest.LogCaptureFixture) -> None:
    url, options = s3_bucket
    secret = s3_bucket.server.secret
    with caplog.at_level(logging.DEBUG):
        fs, path = open_fs(join(url, "log.txt"), options)
        write_bytes(fs, path, b"x")
        read_bytes(fs, path)
    assert secret not in repr(fs)
    assert secret not in str(fs)
    assert secret not in caplog.text
    # Whatever a log line or record might carry from the options is removable.
    assert secret not in str(redact(fs.storage_options))
    assert s3_bucket.server.key not in redact(caplog.text)


def test_wrong_secret_error_has_no_secret(s3_bucket) -> None:
    url, options = s3_bucket
    wrong = "WRONG-" + s3_bucket.server.secret[::-1]
    bad = {**options, "secret": wrong, "config_kwargs": {**options["config_kwargs"], "retries": {"max_attempts": 1}}}
    fs, path = open_fs(join(url, "nope.txt"), bad)
    with pytest.raises(PermissionError) as info:
        write_bytes(fs, path, b"x")
    formatted = "".join(traceback.format_exception(info.value))
    assert wrong not in formatted
    assert s3_bucket.server.secret not in formatted
    assert wrong not in describe_error(info.value)


def test_unreachable_endpoint_error_has_no_secret(s3_bucket) -> None:
    from s3server import free_port

    url, options = s3_bucket
    dead = f"http://127.0.0.1:{free_port()}"
    bad = {
        **options,
        "endpoint_url": dead,
        "config_kwargs": {**options["config_kwargs"], "retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    fs, path = open_fs(join(url, "nope.txt"), bad)
    with pytest.raises(StorageError, match="read s3://") as info:
        read_bytes(fs, path)
    formatted = "".join(traceback.format_exception(info.value))
    assert s3_bucket.server.secret not in formatted
    assert dead in describe_error(info.value)  # the endpoint stays, so the message is still useful


def test_ray_tasks_reach_the_server(ray_local, s3_bucket) -> None:
    """Ray workers (separate processes) open the same bucket from a spec-style reference."""
    url, options = s3_bucket
    fs, path = open_fs(join(url, "from-driver.bin"), options)
    write_bytes(fs, path, b"driver")
    ref = {"endpoint_url": s3_bucket.server.endpoint_url, "region": "us-east-1", "key_env": "K", "secret_env": "S"}
    # Workers resolve the reference against their own environment, as pods do with secretKeyRef env vars.
    env = {"K": s3_bucket.server.key, "S": s3_bucket.server.secret}

    @ray_local.remote
    def copy(src: str, dst: str) -> int:
        opts = resolve_storage_options(ref)
        sfs, spath = open_fs(src, opts)
        dfs, dpath = open_fs(dst, opts)
        data = read_bytes(sfs, spath)
        write_bytes(dfs, dpath, data + b"+worker")
        return len(data)

    task = copy.options(runtime_env={"env_vars": env})
    assert ray_local.get(task.remote(join(url, "from-driver.bin"), join(url, "from-worker.bin"))) == 6
    _, out = open_fs(join(url, "from-worker.bin"), options)
    assert read_bytes(fs, out) == b"driver+worker"


class _NeverAnswers:
    """A TCP server that accepts connections and then neither reads nor answers: a hung S3 endpoint whose
    kernel still holds the connections open."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


# 4 KiB fits the socket buffers: botocore's ``Expect: 100-continue`` left aiohttp waiting, with no time-out,
# for a ``100`` that never comes. 32 MiB does not: the body's send stalls once the server stops reading,
# and aiohttp has no write time-out.
@pytest.mark.parametrize("size", [4 << 10, 32 << 20], ids=["small", "large"])
def test_a_put_to_a_server_that_never_answers_ends_in_an_error(size: int, monkeypatch) -> None:
    from pipeline import storage

    monkeypatch.setattr(storage, "UPLOAD_MIN_BYTES_PER_S", 64 << 20)
    monkeypatch.setattr(storage, "POOL_WAIT_S", 1.0)
    server = _NeverAnswers()
    config = {"read_timeout": 1.0, "connect_timeout": 1.0, "retries": {"max_attempts": 1, "mode": "standard"}}
    fs, path = open_fs(
        f"s3://bucket/hung-{size}.bin", {"key": "k", "secret": "s", "endpoint_url": server.url, "config_kwargs": config}
    )
    fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    outcome: dict[str, BaseException | None] = {}

    def put() -> None:
        try:
            fs.pipe_file(path, b"x" * size)
            outcome["error"] = None
        except BaseException as exc:  # handed to the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=put, daemon=True)
    worker.start()
    worker.join(60)
    server.close()
    assert "error" in outcome, "the PUT never returned"
    assert isinstance(outcome["error"], OSError) and "timeout" in str(outcome["error"]).lower(), outcome["error"]


def test_a_request_waiting_on_a_stuck_connection_pool_ends_in_an_error(s3_bucket, monkeypatch) -> None:
    """The pool's only connection is held by a response nobody closes: the next request of the process ends,
    within the pool-wait bound, in an error (aiohttp would wait forever); once the connection is released
    the same client works again."""
    import time

    import fsspec.asyn

    from pipeline import storage

    monkeypatch.setattr(storage, "POOL_WAIT_S", 1.0)
    url, options = s3_bucket
    config = {**(options.get("config_kwargs") or {}), "max_pool_connections": 1, "connect_timeout": 1.0}
    config["retries"] = {"max_attempts": 1, "mode": "standard"}
    fs, path = open_fs(join(url, "held.bin"), {**options, "config_kwargs": config})
    fs.retries = 1
    data = b"x" * (8 << 20)  # more than the socket buffers hold, so the held response keeps its connection
    write_bytes(fs, path, data)
    bucket, key = path.split("/", 1)
    held = fsspec.asyn.sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key)  # body left unread
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError, match="(?i)connect"):
            fs.cat_file(path)
        assert time.monotonic() - t0 < 15
    finally:
        held["Body"].close()
    assert fs.cat_file(path) == data
