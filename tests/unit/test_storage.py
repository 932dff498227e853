"""pipeline.storage: redaction, options from spec references, URL joining, memory:// and local round trips."""

from __future__ import annotations

import logging
import uuid

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.storage import (
    describe_error,
    join,
    open_fs,
    read_bytes,
    redact,
    register_secret,
    resolve_storage_options,
    safe_options_for_record,
    write_bytes,
)

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture(autouse=True)
def _clean_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------- redact


class TestRedact:
    def test_registered_secret_removed_from_text(self) -> None:
        register_secret(SECRET)
        out = redact(f"request failed; signed with {SECRET} at 12:00")
        assert SECRET not in out
        assert "***" in out
        assert "request failed" in out

    def test_env_secret_removed_without_registration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        value = f"envsecret-{uuid.uuid4().hex}"
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
        assert value not in redact(f"boom {value} boom")

    @pytest.mark.parametrize(
        ("text", "leak"),
        [
            ("s3://user:p4ssw0rd@bucket/key.png", "p4ssw0rd"),
            ("https://AKIAUSERONLY@host.example/x", "AKIAUSERONLY"),
            ("aws_secret_access_key=abcd1234zz", "abcd1234zz"),
            ("secret: hunter2hunter2", "hunter2hunter2"),
            ("{'token': 'tok-123456'}", "tok-123456"),
            ('{"password": "pa55word"}', "pa55word"),
            ("X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIAQQQ%2F2024", "deadbeefcafe"),
            ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAZZZ/2024/us-east-1/s3, Signature=0badf00d", "0badf00d"),
        ],
    )
    def test_text_forms(self, text: str, leak: str) -> None:
        out = redact(text)
        assert leak not in out, out
        assert "***" in out

    def test_text_keeps_object_keys(self) -> None:
        # "key" in prose names an object, not a credential; only registered key values are masked.
        msg = "The specified key does not exist. key: archives/a.zip"
        assert redact(msg) == msg

    def test_url_without_credentials_unchanged(self) -> None:
        assert redact("s3://bucket/a/b.zarr") == "s3://bucket/a/b.zarr"

    def test_dict(self) -> None:
        opts = {
            "endpoint_url": "http://127.0.0.1:9000",
            "key": KEY,
            "secret": SECRET,
            "token": "session-token",
            "key_env": "MY_KEY_VAR",
            "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "nested-secret"},
            "list": [{"password": "pw-123456"}, "s3://u:pw@b"],
            "n": 3,
            "flag": True,
        }
        out = redact(opts)
        assert out["key"] == out["secret"] == out["token"] == "***"
        assert out["key_env"] == "MY_KEY_VAR"  # the env var *name* is a reference, not a secret
        assert out["client_kwargs"] == {"region_name": "eu-west-1", "aws_secret_access_key": "***"}
        assert out["list"] == [{"password": "***"}, "s3://***@b"]
        assert out["n"] == 3 and out["flag"] is True
        assert out["endpoint_url"] == "http://127.0.0.1:9000"
        assert opts["secret"] == SECRET  # input untouched
        for leak in (KEY, SECRET, "session-token", "nested-secret", "pw-123456"):
            assert leak not in repr(out)

    def test_sequences_keep_type(self) -> None:
        assert redact(("s3://a:b@c", 1)) == ("s3://***@c", 1)
        assert redact(["secret=xyz123"]) == ["secret=***"]

    def test_exception_message(self) -> None:
        register_secret(SECRET)
        exc = PermissionError(f"Forbidden for key with secret {SECRET} at s3://u:{SECRET}@bucket")
        out = redact(exc)
        assert isinstance(out, str)
        assert out.startswith("PermissionError: ")
        assert SECRET not in out
        one_line = describe_error(RuntimeError(f"line1\nsecret={SECRET}\n"))
        assert "\n" not in one_line and SECRET not in one_line

    def test_short_values_not_registered(self) -> None:
        register_secret("ab")
        assert redact("abc tab lab") == "abc tab lab"

    def test_log_records_via_redact(self, caplog: pytest.LogCaptureFixture) -> None:
        register_secret(SECRET)
        log = logging.getLogger("test_storage")
        with caplog.at_level(logging.INFO, logger="test_storage"):
            log.info("opening with %s", redact({"secret": SECRET, "endpoint_url": "http://h"}))
        assert SECRET not in caplog.text


# ------------------------------------------------------------------------------ resolve_storage_options


class TestResolveStorageOptions:
    def test_env_references(self) -> None:
        env = {"MY_KEY_VAR": KEY, "MY_SECRET_VAR": SECRET, "MY_TOKEN_VAR": "tok-abcdef"}
        ref = {
            "endpoint_url": "http://127.0.0.1:9000",
            "region": "eu-central-1",
            "anon": False,
            "profile": "batch",
            "key_env": "MY_KEY_VAR",
            "secret_env": "MY_SECRET_VAR",
            "token_env": "MY_TOKEN_VAR",
            "max_attempts": 7,
            "retry_mode": "adaptive",
            "connect_timeout": 5,
            "read_timeout": 30.0,
        }
        opts = resolve_storage_options(ref, environ=env)
        assert opts["key"] == KEY and opts["secret"] == SECRET and opts["token"] == "tok-abcdef"
        assert opts["endpoint_url"] == "http://127.0.0.1:9000"
        assert opts["anon"] is False and opts["profile"] == "batch"
        assert opts["client_kwargs"] == {"region_name": "eu-central-1"}
        assert opts["config_kwargs"] == {
            "retries": {"max_attempts": 7, "mode": "adaptive"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "connect_timeout": 5,
            "read_timeout": 30.0,
        }
        # Resolved secrets are known to redact() from now on.
        assert SECRET not in redact(f"x {SECRET} y")

    def test_os_environ_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DRCR_TEST_KEY", KEY)
        monkeypatch.setenv("DRCR_TEST_SECRET", SECRET)
        opts = resolve_storage_options({"key_env": "DRCR_TEST_KEY", "secret_env": "DRCR_TEST_SECRET"})
        assert (opts["key"], opts["secret"]) == (KEY, SECRET)

    def test_empty_leaves_credentials_to_botocore(self) -> None:
        opts = resolve_storage_options({})
        assert set(opts) == {"config_kwargs"}
        assert opts["config_kwargs"]["retries"] == {
            "max_attempts": storage.DEFAULT_MAX_ATTEMPTS,
            "mode": storage.DEFAULT_RETRY_MODE,
        }
        assert resolve_storage_options(None) == opts

    @pytest.mark.parametrize("field", ["key", "secret", "token", "password", "aws_secret_access_key"])
    def test_literal_secret_refused_without_echo(self, field: str) -> None:
        with pytest.raises(ConfigError, match="key_env") as info:
            resolve_storage_options({field: "literal-value-123"})
        assert "literal-value-123" not in str(info.value)

    def test_missing_env_var_names_variable_not_value(self) -> None:
        with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
            resolve_storage_options({"key_env": "NOT_SET_ANYWHERE", "secret_env": "X"}, environ={})

    @pytest.mark.parametrize(
        ("ref", "match"),
        [
            ({"endpoint": "http://x"}, "unknown field"),
            ({"endpoint_url": "ftp://x"}, "endpoint_url"),
            ({"endpoint_url": "http://u:p@host:9000"}, "credentials"),
            ({"anon": "yes"}, "anon"),
            ({"max_attempts": 0}, "max_attempts"),
            ({"max_attempts": True}, "max_attempts"),
            ({"retry_mode": "fast"}, "retry_mode"),
            ({"checksum": "always"}, "checksum"),
            ({"read_timeout": -1}, "read_timeout"),
            ({"key_env": "bad name"}, "key_env"),
            ({"key_env": "K"}, "together"),
            ({"anon": True, "key_env": "K", "secret_env": "S"}, "anon"),
        ],
    )
    def test_invalid(self, ref: dict, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            resolve_storage_options(ref, environ={"K": "k" * 16, "S": "s" * 16})

    def test_endpoint_error_does_not_echo_credentials(self) -> None:
        with pytest.raises(ConfigError) as info:
            resolve_storage_options({"endpoint_url": "http://user:pw-zz99@host"})
        assert "pw-zz99" not in str(info.value)


class TestSafeOptionsForRecord:
    def test_no_secrets(self) -> None:
        opts = resolve_storage_options(
            {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "key_env": "K", "secret_env": "S"},
            environ={"K": KEY, "S": SECRET},
        )
        rec = safe_options_for_record(opts, environ={})
        assert rec == {
            "endpoint_url": "http://127.0.0.1:9000",
            "region": "eu-west-1",
            "anon": False,
            "profile": None,
            "explicit_credentials": True,
            "retry_mode": storage.DEFAULT_RETRY_MODE,
            "max_attempts": storage.DEFAULT_MAX_ATTEMPTS,
        }
        assert KEY not in repr(rec) and SECRET not in repr(rec)

    def test_falls_back_to_environment(self) -> None:
        env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "us-west-2", "AWS_PROFILE": "p"}
        rec = safe_options_for_record({}, environ=env)
        assert rec["endpoint_url"] == "http://minio:9000"
        assert rec["region"] == "us-west-2"
        assert rec["profile"] == "p"
        assert rec["explicit_credentials"] is False

    def test_endpoint_credentials_redacted(self) -> None:
        rec = safe_options_for_record({"endpoint_url": "http://u:pw-777@h:1"}, environ={})
        assert "pw-777" not in rec["endpoint_url"]


# --------------------------------------------------------------------------------------------- open_fs


class TestOpenFs:
    def test_memory_round_trip(self) -> None:
        base = f"memory://drcr-test-{uuid.uuid4().hex}"
        fs, path = open_fs(join(base, "a", "b.bin"))
        assert isinstance(fs, MemoryFileSystem)
        write_bytes(fs, path, b"0123456789")
        assert read_bytes(fs, path) == b"0123456789"
        assert read_bytes(fs, path, 2, 5) == b"234"
        fs2, root = open_fs(base)
        assert fs2.find(root) == [path]

    def test_s3_options_ignored_for_memory_and_local(self, tmp_path) -> None:
        opts = resolve_storage_options({"endpoint_url": "http://127.0.0.1:1", "region": "x"})
        fs, _ = open_fs(f"memory://drcr-{uuid.uuid4().hex}", opts)
        assert isinstance(fs, MemoryFileSystem)
        fs, path = open_fs(str(tmp_path / "x.bin"), opts)
        assert isinstance(fs, LocalFileSystem)

    def test_local_atomic_write(self, tmp_path) -> None:
        fs, path = open_fs(str(tmp_path / "sub" / "dir" / "obj.json"))
        write_bytes(fs, path, b"{}")
        write_bytes(fs, path, b'{"a": 1}')
        assert (tmp_path / "sub" / "dir" / "obj.json").read_bytes() == b'{"a": 1}'
        assert sorted(p.name for p in (tmp_path / "sub" / "dir").iterdir()) == ["obj.json"]  # no temp left

    def test_s3_defaults_applied(self) -> None:
        fs, path = open_fs("s3://bucket/prefix/x", {"endpoint_url": "http://127.0.0.1:1", "key": KEY, "secret": SECRET})
        assert path == "bucket/prefix/x"
        config = fs.storage_options["config_kwargs"]
        assert config["request_checksum_calculation"] == "when_required"
        assert config["response_checksum_validation"] == "when_required"
        assert "retries" in config
        assert SECRET not in repr(fs) and KEY not in repr(fs)
        # Options handed to open_fs are remembered as secrets.
        assert SECRET not in redact(str(fs.storage_options))


class TestJoin:
    @pytest.mark.parametrize(
        ("url", "parts", "expected"),
        [
            ("s3://bucket", ("a", "b.zarr"), "s3://bucket/a/b.zarr"),
            ("s3://bucket/", ("/a/", "/b/"), "s3://bucket/a/b"),
            ("s3://", ("bucket", "x"), "s3://bucket/x"),
            ("memory://root", ("a//b",), "memory://root/a/b"),
            ("/tmp/out", ("c.json",), "/tmp/out/c.json"),
            ("s3://bucket/p", (), "s3://bucket/p"),
            ("s3://bucket/p", ("",), "s3://bucket/p"),
        ],
    )
    def test_join(self, url: str, parts: tuple[str, ...], expected: str) -> None:
        assert join(url, *parts) == expected

    @pytest.mark.parametrize("bad", ["..", "a/../b", "./a"])
    def test_refuses_dot_segments(self, bad: str) -> None:
        with pytest.raises(ValueError, match="segment"):
            join("s3://bucket", bad)
