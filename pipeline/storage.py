"""The one place that builds filesystems: fsspec URLs (s3://, gs://, az://, memory://, local paths).

Everything that reads or writes (sources, cubes, manifest, weights) gets its filesystem from
:func:`open_fs` (or its zarr store from :func:`open_store`). Storage options come from the job spec's
storage section *by reference* (:func:`resolve_storage_options`) or from the standard environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_PROFILE``,
instance/pod roles), which botocore reads itself.

Secrets never sit in a spec: the spec names the environment variable that holds them (``key_env``,
``secret_env``, ``token_env``). Every secret value this process handles is remembered so :func:`redact`
can strip it from log lines, provenance, manifest rows and error messages.

Transient S3 failures (connection resets, 5xx, throttling, a server restarting) are retried by botocore's
own retry modes, configured here once (``retries={"max_attempts": N, "mode": ...}``); there are no
hand-written retry loops in this package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import ConfigError, StorageError

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RETRY_MODE",
    "RedactingFilter",
    "check_reachable",
    "check_url",
    "client_error_types",
    "deadline_of",
    "describe_error",
    "join",
    "open_fs",
    "open_store",
    "read_bytes",
    "readable",
    "readable_tree",
    "redact",
    "register_secret",
    "resolve_storage_options",
    "safe_options_for_record",
    "storage_errors",
    "write_bytes",
]

logger = logging.getLogger(__name__)

#: botocore attempts per request, the first included. Ten standard-mode attempts back off for up to
#: ~1 + 2 + 4 + 8 + 16 + 4 x 20 s, long enough to ride out an S3 endpoint restarting mid-job.
DEFAULT_MAX_ATTEMPTS = 10
#: botocore retry mode: "standard" (exponential backoff with jitter) or "adaptive" (plus client-side
#: rate limiting after throttling errors; see botocore's retries guide).
DEFAULT_RETRY_MODE = "standard"
#: botocore >= 1.36 adds CRC checksums to every request by default. S3-compatible servers that predate
#: that change (rclone serve s3, older MinIO/Ceph) reject or mis-validate them; "when_required" restores
#: the old behaviour and costs nothing on AWS.
DEFAULT_CHECKSUM_POLICY = "when_required"
#: Seconds to open a connection, and to wait for each read of a response (botocore's own defaults are 60 s
#: each). A refused or black-holed endpoint then costs attempts × these, not minutes per request.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
#: Seconds an S3 request may wait for a free connection of its client's pool. aiohttp leaves that wait
#: unbounded: a slot never handed back (a response nobody closed) parks every later request of the process,
#: with no error. Bounded, it ends in botocore's ConnectTimeoutError, which its retry modes retry. Generous, so
#: a legitimately long queue (a batch putting many chunks at once to a slow endpoint) is not cut off.
POOL_WAIT_S = 120.0
#: The slowest average rate an S3 upload may go at before it is given up (and retried by botocore): aiohttp
#: has no write time-out, so without one a server that stops reading holds a PUT forever.
UPLOAD_MIN_BYTES_PER_S = 1 << 20
#: Seconds the first contact with each storage endpoint may take, retries included (``storage.deadline_s``):
#: a job whose endpoint refuses or never answers fails with one line instead of retrying for minutes.
DEFAULT_DEADLINE_S = 20.0

_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_HTTP_PROTOCOLS = frozenset({"http", "https"})
_RETRY_MODES = frozenset({"standard", "adaptive", "legacy"})
_CHECKSUM_POLICIES = frozenset({"when_required", "when_supported"})

#: Keys a spec's storage section may hold. Anything else is a ConfigError, so a typo cannot silently
#: fall back to the environment.
_REF_FIELDS = frozenset(
    {
        "endpoint_url",
        "region",
        "profile",
        "anon",
        "key_env",
        "secret_env",
        "token_env",
        "max_attempts",
        "retry_mode",
        "checksum",
        "connect_timeout",
        "read_timeout",
        "deadline_s",
    }
)

#: Option / dict keys whose values are secrets (compared lower-case). ``key`` is the access key id:
#: not secret on its own, but it identifies the account, so it is treated like one.
_SECRET_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "session_token",
        "security_token",
        "access_key",
        "secret_key",
        "access_key_id",
        "secret_access_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_security_token",
        "account_key",
        "sas_token",
        "client_secret",
        "connection_string",
        "credentials",
        "authorization",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)

#: Environment variables whose values are secrets wherever they appear.
_SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)

_MASK = "***"
#: Shorter values are not registered as secrets: replacing every "ab" in a log would make it unreadable,
#: and real credentials are far longer.
_MIN_SECRET_LEN = 4

_known_secrets: set[str] = set()
_known_lock = threading.Lock()

# In free text a bare "key" is too common ("the specified key does not exist", "key: a/b.png" naming an
# object) to mask its value; registered key values are masked anyway, and dicts mask the "key" field.
_TEXT_KEYS = (_SECRET_KEYS - {"key"}) | {"credential"}
_key_alternation = "|".join(sorted((re.escape(k) for k in _TEXT_KEYS), key=len, reverse=True))
# scheme://user:pass@host or scheme://user@host  →  scheme://***@host
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"]+)@")
# key=value, key: value, 'key': 'value', "key": "value", Credential=..., X-Amz-Signature=...
_KEY_VALUE = re.compile(
    rf"(?P<name>(?<![A-Za-z0-9_\-])(?:{_key_alternation}))(?P<q1>['\"]?)(?P<sep>\s*[=:]\s*)(?P<q2>b?['\"]?)"
    r"(?P<value>[^\s'\",;&}\])]+)",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------------- secrets


def register_secret(value: str | None) -> None:
    """Remember ``value`` as a secret so :func:`redact` removes it from any text from now on."""
    if isinstance(value, str) and len(value) >= _MIN_SECRET_LEN:
        with _known_lock:
            _known_secrets.add(value)


def _secret_values() -> list[str]:
    values = set(_known_secrets)
    for name in _SECRET_ENV_VARS:
        v = os.environ.get(name)
        if v and len(v) >= _MIN_SECRET_LEN:
            values.add(v)
    # Longest first, so a secret that contains another is masked whole.
    return sorted(values, key=len, reverse=True)


def _is_secret_key(name: object) -> bool:
    if not isinstance(name, str):
        return False
    low = name.lower()
    if low.endswith("_env"):  # a reference (the *name* of an env var), not a value
        return False
    return low in _SECRET_KEYS or low.endswith(("_secret", "_token", "_password", "secret_access_key"))


def readable(text: str) -> str:
    """``text`` as valid Unicode, for anything recorded or shown: bytes of a name that were not UTF-8 (Python
    keeps them as surrogate escapes, e.g. the latin-1 tar member ``caf\\xe9.png``) become ``\\xe9``.

    The raw name stays in :class:`~pipeline.sources.ImageRef` for reading; only its records use this.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")


def readable_tree(obj: Any) -> Any:
    """:func:`readable` applied to every string (keys too) of a JSON-like tree."""
    if isinstance(obj, str):
        return readable(obj)
    if isinstance(obj, Mapping):
        return {readable_tree(k): readable_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [readable_tree(v) for v in obj]
    return obj


def _redact_text(text: str) -> str:
    text = readable(text)
    for value in _secret_values():
        if value in text:
            text = text.replace(value, _MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{_MASK}@", text)
    return _KEY_VALUE.sub(
        lambda m: f"{m['name']}{m['q1']}{m['sep']}{m['q2']}{_MASK}" if m["value"] != _MASK else m[0], text
    )


def redact(obj: Any) -> Any:
    """Return ``obj`` with secret values removed, for logs, provenance, manifest rows and error messages.

    - ``str``: known secret values (registered options, env-var secrets such as ``AWS_SECRET_ACCESS_KEY``)
      become ``***``, as do credentials in URLs (``s3://user:pass@bucket`` → ``s3://***@bucket``) and the
      values in ``key=...``, ``secret: ...``, ``'token': '...'``, ``Signature=...`` forms.
    - ``Mapping``: a new ``dict``; values under secret keys (``key``, ``secret``, ``token``, ``password``,
      ``aws_secret_access_key``, ...) become ``***``, other values are redacted recursively. Keys ending in
      ``_env`` are references to env vars and are kept.
    - ``list`` / ``tuple`` / ``set``: same type, items redacted.
    - ``BaseException``: its redacted message, ``"TypeName: message"`` (a ``str``).
    - anything else (numbers, bools, None, ...) is returned unchanged.
    """
    if isinstance(obj, str):
        return _redact_text(obj)
    if isinstance(obj, BaseException):
        return _redact_text(f"{type(obj).__name__}: {obj}")
    if isinstance(obj, Mapping):
        return {k: (_MASK if _is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(redact(v) for v in obj)
    return obj


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_MAX_ERROR_CHARS = 600


def describe_error(exc: BaseException) -> str:
    """One-line, secret-free description of ``exc`` for manifest rows and log lines.

    An error that wraps another raised elsewhere (Ray's task errors carry the remote traceback, coloured,
    in their text, and the original as ``cause``) is described by that original; ANSI escapes are removed
    and the line is cut at 600 characters.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = " ".join(_ANSI.sub("", redact(exc)).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


class RedactingFilter(logging.Filter):
    """Redacts every record a handler emits (message, arguments, traceback, stack), whoever logged it:
    botocore's, s3fs's and urllib3's debug lines print headers, signatures and credentials. The CLI
    installs one on each handler it configures."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a library's malformed %-format: keep its raw text
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# --------------------------------------------------------------------------------------------- options


def _env_value(field: str, var: object, environ: Mapping[str, str]) -> str:
    if not isinstance(var, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
        raise ConfigError(f"storage.{field} must name an environment variable, got {var!r}")
    value = environ.get(var)
    if not value:
        raise ConfigError(
            f"storage.{field} names environment variable {var!r}, which is not set (or empty) in this process; "
            f"export it, or on Kubernetes map it from a Secret with env[].valueFrom.secretKeyRef"
        )
    register_secret(value)
    return value


def check_storage_section(ref: Mapping[str, Any]) -> None:
    """Refuse a spec's storage section that holds a literal secret (never echoing it) or an unknown field."""
    literal = sorted(k for k in ref if _is_secret_key(k))
    if literal:
        raise ConfigError(
            f"storage section holds literal secret field(s) {literal}; secrets go in the environment and the "
            f"spec names the variable: use key_env / secret_env / token_env instead"
        )
    unknown = sorted(set(ref) - _REF_FIELDS)
    if unknown:
        raise ConfigError(f"storage section has unknown field(s) {unknown}; allowed: {sorted(_REF_FIELDS)}")
    for field in ("connect_timeout", "read_timeout", "deadline_s"):
        if ref.get(field) is not None:
            _seconds(ref, field)


def check_url(url: str, field: str) -> None:
    """Refuse a URL with user-info (``s3://KEY:SECRET@bucket/x``): secrets never sit in URLs, which end up in
    logs, manifests and provenance. The message shows the URL with the user-info masked."""
    if _URL_USERINFO.match(url.strip()):
        raise ConfigError(
            f"{field} {redact(url)!r} carries credentials in the URL (user-info before '@'); remove them and "
            f"name the environment variables that hold them in [storage] key_env / secret_env"
        )


def resolve_storage_options(ref: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn a job spec's storage section into fsspec/s3fs options, reading secrets from the environment.

    Args:
        ref: the spec's storage section, e.g. ``{"endpoint_url": "http://minio:9000", "region": "us-east-1",
            "anon": False, "profile": "x", "key_env": "MY_KEY_VAR", "secret_env": "MY_SECRET_VAR",
            "token_env": "MY_TOKEN_VAR", "max_attempts": 10, "retry_mode": "standard",
            "checksum": "when_required", "connect_timeout": 10, "read_timeout": 60}``; every field optional.
            Literal secrets (``key``, ``secret``, ``token``, ...) are refused.
        environ: where ``*_env`` references are looked up; ``os.environ`` by default.

    Returns:
        s3fs keyword options (``endpoint_url``, ``key``, ``secret``, ``token``, ``anon``, ``profile``,
        ``client_kwargs={"region_name": ...}``, ``config_kwargs={"retries": ..., checksum policies,
        timeouts}``). Fields left out are left to botocore's own resolution from the standard environment
        (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance roles). The
        result holds secrets: pass it to :func:`open_fs`, never log or record it (use
        :func:`safe_options_for_record`).
    """
    ref = dict(ref or {})
    env = os.environ if environ is None else environ
    check_storage_section(ref)

    opts: dict[str, Any] = {}
    if ref.get("endpoint_url") is not None:
        endpoint = ref["endpoint_url"]
        if not isinstance(endpoint, str) or not re.match(r"^https?://[^/\s]+", endpoint):
            raise ConfigError(f"storage.endpoint_url must be an http(s) URL, got {redact(str(endpoint))!r}")
        if _URL_USERINFO.search(endpoint):
            raise ConfigError("storage.endpoint_url must not carry credentials (user:pass@); use key_env/secret_env")
        opts["endpoint_url"] = endpoint
    if ref.get("anon") is not None:
        if not isinstance(ref["anon"], bool):
            raise ConfigError(f"storage.anon must be true or false, got {ref['anon']!r}")
        opts["anon"] = ref["anon"]
    if ref.get("profile") is not None:
        if not isinstance(ref["profile"], str) or not ref["profile"]:
            raise ConfigError(f"storage.profile must be a non-empty string, got {ref['profile']!r}")
        opts["profile"] = ref["profile"]
    for field, option in (("key_env", "key"), ("secret_env", "secret"), ("token_env", "token")):
        if ref.get(field) is not None:
            opts[option] = _env_value(field, ref[field], env)
    if ("key" in opts) != ("secret" in opts):
        raise ConfigError("storage.key_env and storage.secret_env must be given together (or neither)")
    if opts.get("anon") and "key" in opts:
        raise ConfigError("storage.anon = true contradicts key_env/secret_env; drop one")

    client_kwargs: dict[str, Any] = {}
    if ref.get("region") is not None:
        if not isinstance(ref["region"], str) or not ref["region"]:
            raise ConfigError(f"storage.region must be a non-empty string, got {ref['region']!r}")
        client_kwargs["region_name"] = ref["region"]
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs

    max_attempts = ref.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= 50:
        raise ConfigError(f"storage.max_attempts must be an integer in [1, 50], got {max_attempts!r}")
    mode = ref.get("retry_mode", DEFAULT_RETRY_MODE)
    if mode not in _RETRY_MODES:
        raise ConfigError(f"storage.retry_mode must be one of {sorted(_RETRY_MODES)}, got {mode!r}")
    checksum = ref.get("checksum", DEFAULT_CHECKSUM_POLICY)
    if checksum not in _CHECKSUM_POLICIES:
        raise ConfigError(f"storage.checksum must be one of {sorted(_CHECKSUM_POLICIES)}, got {checksum!r}")
    config_kwargs: dict[str, Any] = {
        "retries": {"max_attempts": max_attempts, "mode": mode},
        "request_checksum_calculation": checksum,
        "response_checksum_validation": checksum,
    }
    for field in ("connect_timeout", "read_timeout"):
        if ref.get(field) is not None:
            config_kwargs[field] = _seconds(ref, field)
    deadline_of(ref)  # validated here, used by check_reachable
    opts["config_kwargs"] = config_kwargs
    return opts


def _seconds(ref: Mapping[str, Any], field: str) -> float:
    t = ref[field]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 86400:
        raise ConfigError(f"storage.{field} must be a positive number of seconds (< 1 day), got {t!r}")
    return float(t)


def deadline_of(ref: Mapping[str, Any] | None) -> float:
    """The spec's ``storage.deadline_s`` (seconds), or :data:`DEFAULT_DEADLINE_S`."""
    if not ref or ref.get("deadline_s") is None:
        return DEFAULT_DEADLINE_S
    return _seconds(ref, "deadline_s")


def _s3_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the retry and checksum defaults filled in where the caller left them out."""
    opts = dict(options)
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": DEFAULT_RETRY_MODE})
    config.setdefault("request_checksum_calculation", DEFAULT_CHECKSUM_POLICY)
    config.setdefault("response_checksum_validation", DEFAULT_CHECKSUM_POLICY)
    config.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    config.setdefault("read_timeout", DEFAULT_READ_TIMEOUT)
    config.setdefault("http_session_cls", _bounded_session())
    opts["config_kwargs"] = config
    return opts


def _bounded_session() -> type:
    """aiobotocore's aiohttp session with every wait of a request bounded (:mod:`pipeline._http`)."""
    from pipeline._http import BoundedSession  # deferred: aiobotocore is imported only for S3

    return BoundedSession


def safe_options_for_record(
    options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What may be recorded in provenance about the storage: endpoint, region, anon, profile, retries.

    Values not in ``options`` are taken from the standard environment (``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``) as botocore would.
    Never contains keys, secrets or tokens; whether credentials were given is recorded as a bool.
    """
    env = os.environ if environ is None else environ
    opts = dict(options or {})
    client = opts.get("client_kwargs") or {}
    config = opts.get("config_kwargs") or {}
    retries = config.get("retries") or {}
    endpoint = opts.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    record: dict[str, Any] = {
        "endpoint_url": redact(endpoint) if endpoint else None,
        "region": client.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        "anon": bool(opts.get("anon", False)),
        "profile": opts.get("profile") or env.get("AWS_PROFILE"),
        "explicit_credentials": "key" in opts or "secret" in opts,
        "retry_mode": retries.get("mode", DEFAULT_RETRY_MODE),
        "max_attempts": retries.get("max_attempts", retries.get("total_max_attempts", DEFAULT_MAX_ATTEMPTS)),
    }
    return record


# ------------------------------------------------------------------------------------------ filesystems


def _protocol(url: str) -> str:
    protocol = fsspec.utils.get_protocol(url)
    return protocol if isinstance(protocol, str) else protocol[0]


#: Options of the spec's storage section (:func:`resolve_storage_options`) that only botocore/s3fs
#: understand; other filesystems raise TypeError on them (``config_kwargs`` for HTTP), so they are dropped.
_S3_ONLY_OPTIONS = frozenset({"config_kwargs", "client_kwargs", "endpoint_url", "key", "secret", "token", "profile"})


def _options_for(protocol: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options one protocol's filesystem gets: one job spec serves inputs and outputs of any protocol."""
    opts = dict(storage_options or {})
    for k, v in opts.items():
        if _is_secret_key(k) and isinstance(v, str):
            register_secret(v)
    if protocol in _S3_PROTOCOLS:
        return _s3_defaults(opts)
    if protocol in _LOCAL_PROTOCOLS or protocol == "memory":
        # The same spec-level options serve input and output; a local or in-memory side needs none.
        if opts:
            logger.debug("ignoring storage options %s for %s:// URL", sorted(opts), protocol)
        return {}
    kept = {k: v for k, v in opts.items() if k not in _S3_ONLY_OPTIONS}
    if protocol in _HTTP_PROTOCOLS:
        kept.pop("anon", None)
        kept.setdefault("client_kwargs", {"timeout": _http_timeout(opts)})
    return kept


def _http_timeout(opts: Mapping[str, Any]) -> Any:
    """aiohttp's time-outs for HTTP(S) inputs, from the same connect/read settings as S3."""
    import aiohttp

    config = opts.get("config_kwargs") or {}
    return aiohttp.ClientTimeout(
        sock_connect=config.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        sock_read=config.get("read_timeout", DEFAULT_READ_TIMEOUT),
    )


def open_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; ``path`` is what that filesystem's methods take.

    Args:
        url: ``s3://bucket/prefix``, ``memory://...``, ``file:///...``, a local path, or any fsspec URL.
        storage_options: options for the filesystem, usually from :func:`resolve_storage_options`. For
            ``s3://`` the botocore retry and checksum defaults are added where missing; for local and
            ``memory://`` URLs they are ignored, so one set of options can serve both sides of a job.
    """
    protocol = _protocol(url)
    fs, path = fsspec.core.url_to_fs(url, **_options_for(protocol, storage_options))
    return fs, path


def open_store(url: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False) -> Any:
    """A zarr v3 store for ``url``: ``LocalStore`` for local paths, ``FsspecStore`` (async fsspec) otherwise."""
    import zarr.storage  # deferred: storage helpers are used in places that never touch zarr

    protocol = _protocol(url)
    if protocol in _LOCAL_PROTOCOLS:
        _, path = fsspec.core.url_to_fs(url)
        return zarr.storage.LocalStore(path, read_only=read_only)
    opts = _options_for(protocol, storage_options)
    return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


# ---------------------------------------------------------------------------------------------- paths


def join(url: str, *parts: str) -> str:
    """Join ``parts`` onto ``url`` with single ``/`` separators, keeping the scheme (``s3://b/a`` + ``x/y``).

    Object stores such as rclone's reject keys with empty, ``.`` or ``..`` segments, so those are refused
    here with a ValueError naming the part.
    """
    out = url.rstrip("/") if not url.endswith("://") else url
    for part in parts:
        segments = [s for s in str(part).split("/") if s]
        for s in segments:
            if s in (".", ".."):
                raise ValueError(f"join: path part {part!r} has a {s!r} segment; object keys must be canonical")
        if not segments:
            continue
        sep = "" if out.endswith("/") else "/"
        out = f"{out}{sep}{'/'.join(segments)}"
    return out


# ------------------------------------------------------------------------------------------ first contact


def check_reachable(url: str, storage_options: Mapping[str, Any] | None, *, deadline_s: float, output: bool) -> None:
    """Contact ``url``'s store once, within ``deadline_s`` seconds, retries included.

    For an output: it must not be an existing file, and its bucket must exist. For an input: the store must
    answer (whether the path exists is :func:`pipeline.sources.expand_inputs`' to say). Raises
    :class:`StorageError` (unreachable, no answer in time) or :class:`ConfigError` (output is a file, bucket
    missing), one line naming the URL, never a secret. Local and ``memory://`` URLs need no contact.
    """
    protocol = _protocol(url)
    role = "output" if output else "input"
    if protocol in _LOCAL_PROTOCOLS or protocol == "memory":
        if output:
            fs, path = open_fs(url)
            if fs.isfile(path):
                raise ConfigError(f"output {url!r} is an existing file; the output must be a folder or prefix")
        return
    result: dict[str, BaseException | None] = {}
    done = threading.Event()

    def probe() -> None:
        try:
            _probe(url, _probe_options(protocol, storage_options), output=output)
            result["error"] = None
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc
        finally:
            done.set()

    # A daemon thread: a request that never returns must not keep the process alive after the error.
    threading.Thread(target=probe, name="storage-probe", daemon=True).start()
    if not done.wait(deadline_s):
        raise StorageError(
            f"{role} {redact(url)!r}: the storage endpoint gave no answer within {deadline_s:g} s "
            f"(storage.deadline_s); check storage.endpoint_url / AWS_ENDPOINT_URL"
        )
    error = result.get("error")
    if isinstance(error, ConfigError):
        raise error
    if isinstance(error, FileNotFoundError):
        raise ConfigError(f"{role} {redact(url)!r}: the bucket does not exist; create it first") from error
    if error is not None:
        raise StorageError(f"{role} {redact(url)!r}: storage unreachable: {describe_error(error)}") from error


def _probe_options(protocol: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job's options with at most 3 attempts: a first contact that fails should fail fast."""
    opts = dict(storage_options or {})
    if protocol in _S3_PROTOCOLS:
        opts = _s3_defaults(opts)
        config = dict(opts["config_kwargs"])
        retries = dict(config.get("retries") or {})
        retries["max_attempts"] = min(int(retries.get("max_attempts", DEFAULT_MAX_ATTEMPTS)), 3)
        config["retries"] = retries
        opts["config_kwargs"] = config
    return opts


def _probe(url: str, options: Mapping[str, Any], *, output: bool) -> None:
    fs, path = open_fs(url, options)
    if _protocol(url) in _S3_PROTOCOLS:
        bucket = path.split("/", 1)[0]
        try:
            fs.info(bucket)  # FileNotFoundError when the bucket is missing
        except PermissionError:
            return  # the store answered; a role allowed only some prefixes may still do the job
        if output and path.strip("/") != bucket and fs.isfile(path):
            raise ConfigError(f"output {redact(url)!r} is an existing object; the output must be a prefix")
    elif output:
        if fs.isfile(path):
            raise ConfigError(f"output {redact(url)!r} is an existing file; the output must be a folder or prefix")
    else:
        fs.exists(path)


# --------------------------------------------------------------------------------------------- errors


def _client_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        types += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as AioClientError

        types.append(AioClientError)
    return tuple(types)


def client_error_types() -> tuple[type[BaseException], ...]:
    """The storage clients' own error types (botocore, aiohttp), which are not ``OSError``s."""
    return _client_error_types()


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn storage-client failures (after the client's own retries) into :class:`StorageError`.

    botocore's connection and service errors are not ``OSError``s; inside this block they become a
    ``StorageError`` (an ``OSError``) whose message names ``what`` (e.g. ``"write s3://b/x"``) and carries
    no secret. ``FileNotFoundError``/``PermissionError`` raised by s3fs pass through unchanged: callers
    treat "missing" and "forbidden" differently from "unreachable".
    """
    try:
        yield
    except _client_error_types() as e:
        raise StorageError(f"{redact(what)}: {describe_error(e)}") from e


# ---------------------------------------------------------------------------------------------- bytes


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` as the whole object at ``path``; readers see the old object or the new one, never half.

    Raises :class:`StorageError` when the store stays unreachable after the client's retries.

    Object stores: one ``PutObject`` (or a multipart upload, which also only appears on completion).
    Local files: written beside the target and renamed into place (``os.replace`` is atomic on POSIX).
    """
    if isinstance(fs, LocalFileSystem):
        parent = fs._parent(path)
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with storage_errors(f"write {_url(fs, path)}"):
        fs.pipe_file(path, data)


def read_bytes(fs: AbstractFileSystem, path: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of the object at ``path`` (whole object by default): one ranged GET on S3."""
    with storage_errors(f"read {_url(fs, path)}"):
        data = fs.cat_file(path, start=start, end=end)
    return bytes(data)


def _url(fs: AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)
