"""Issue 15 at the unit level: group names (digest, length, transliteration, owner), readable records,
redaction of log records, URL user-info, per-protocol options, strict spec types, weights against the job."""

from __future__ import annotations

import hashlib
import itertools
import logging

import pytest

from drcr_model.checkpoint import CheckpointError
from drcr_model.weights import check_config_for_job, untrained_demo_weights
from pipeline import cubes, storage
from pipeline.config import JobSpec, parse_overrides
from pipeline.errors import ConfigError, GroupCollisionError
from pipeline.manifest import ManifestRow, read_manifest, write_manifest


def _old_group_suffix(key: str) -> str:
    """The 32-bit suffix group names had before issue 15."""
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def test_group_path_digest_is_64_bits() -> None:
    """Two member names that sanitise alike and shared the old 32-bit suffix (found by brute force, as the
    issue did) now get different groups with 16-hex suffixes."""
    seen: dict[tuple[str, str], str] = {}
    pair = None
    for i in itertools.count():
        member = f"a b{i}.png" if i % 2 else f"a_b{i}.png"
        san = cubes.sanitize_component(member)
        key = f"s3://x/a.tar!{member}@0"
        suffix = _old_group_suffix(key)
        if (san[:3], suffix) in seen:
            pair = (seen[(san[:3], suffix)], key)
            break
        seen[(san[:3], suffix)] = key
        assert i < 500_000
    a, b = pair
    ga = cubes.group_path("s3://x/a.tar", a.split("!")[1].rsplit("@", 1)[0], a)
    gb = cubes.group_path("s3://x/a.tar", b.split("!")[1].rsplit("@", 1)[0], b)
    assert ga != gb and len(ga.rsplit("-", 1)[1]) == len(gb.rsplit("-", 1)[1]) == 16


def test_components_are_short_readable_and_never_hidden() -> None:
    long = cubes.sanitize_component("n" * 300 + ".png")
    assert (
        len(long) == cubes.MAX_COMPONENT
        and long.startswith("nnn")
        and long != cubes.sanitize_component("n" * 301 + ".png")
    )
    assert cubes.sanitize_component("東京.png") == "DongJing.png"
    assert cubes.sanitize_component("Ελλάδα.jpg") == "Ellada.jpg"
    assert cubes.sanitize_component(".hidden.png") == "x.hidden.png"
    assert cubes.sanitize_component("caf\udce9.png") == "caf_xe9.png"
    group = cubes.group_path("/in/東京.png", None, "/in/東京.png")
    assert group.startswith("DongJing.png-") and not any(p.startswith(".") for p in group.split("/"))


def test_check_owner_refuses_another_inputs_group() -> None:
    attrs = {cubes.ATTR: {"source": {"key": "s3://b/a.tar!x.png@0"}}}
    cubes.check_owner(attrs, "g", "s3://b/a.tar!x.png@0")
    cubes.check_owner(None, "g", "anything")
    cubes.check_owner({cubes.ATTR: {"source": {}}}, "g", "anything")  # groups written before keys were recorded
    with pytest.raises(GroupCollisionError, match="collides with the cube of 's3://b/a.tar!x.png@0'"):
        cubes.check_owner(attrs, "g", "s3://b/a.tar!y.png@1")


def test_manifest_keeps_names_that_are_not_utf8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    row = ManifestRow(input="/in/caf\udce9.png", source="/in/caf\udce9.png", status="failed", error="x\udcff")
    write_manifest(str(tmp_path), [row], "r1")
    (got,) = read_manifest(str(tmp_path)).to_pylist()
    assert got["input"] == "/in/caf\\xe9.png" and got["error"] == "x\\xff"


def test_redacting_filter_covers_every_record(capsys) -> None:  # type: ignore[no-untyped-def]
    storage.register_secret("AKIAFILTERTEST0001")
    logger = logging.getLogger("botocore.test_hostile")
    handler = logging.StreamHandler()
    handler.addFilter(storage.RedactingFilter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "headers %s", {"Authorization": "Credential=AKIAFILTERTEST0001/x", "X-Amz-Security-Token": b"tok"}
        )
        try:
            raise RuntimeError("secret=hunter2xyz")
        except RuntimeError:
            logger.exception("failed with key AKIAFILTERTEST0001")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "AKIAFILTERTEST0001" not in err and "hunter2xyz" not in err and "b'tok'" not in err, err
    assert err.count("***") >= 3 and "RuntimeError" in err


def test_url_user_info_refused_and_masked() -> None:
    with pytest.raises(ConfigError) as e:
        JobSpec.from_dict({"inputs": ["s3://KEYID123:SECRET456@b/x.png"], "output": "out"})
    assert "KEYID123" not in str(e.value) and "SECRET456" not in str(e.value) and "s3://***@b/x.png" in str(e.value)
    with pytest.raises(ConfigError, match="output"):
        JobSpec.from_dict({"inputs": ["x.png"], "output": "https://u:p@host/out"})


def test_s3_options_never_reach_http() -> None:
    opts = storage.resolve_storage_options({"endpoint_url": "http://127.0.0.1:9", "region": "r", "read_timeout": 7})
    http = storage._options_for("https", opts)
    assert set(http) == {"client_kwargs"} and http["client_kwargs"]["timeout"].sock_read == 7
    s3 = storage._options_for("s3", opts)["config_kwargs"]
    assert s3["read_timeout"] == 7 and s3["connect_timeout"] == storage.DEFAULT_CONNECT_TIMEOUT


@pytest.mark.parametrize(
    "override",
    [
        "ray.actors=1.9",
        "ray.actors=true",
        "ray.overlap_writes=1",
        "tiling.halo=8.0",
        "inference.mode=1",
        "output_options.level=22",
        "ray.decode_num_cpus=inf",
        "name=3",
        "storage.deadline_s=0",
    ],
)
def test_strict_types(override: str) -> None:
    with pytest.raises(ConfigError):
        JobSpec.from_dict({"inputs": ["x.png"], "output": "o"}).with_overrides(parse_overrides([override]))


def test_ints_accepted_for_floats_and_zstd_levels_to_22() -> None:
    spec = JobSpec.from_dict({"inputs": ["x.png"], "output": "o"}).with_overrides(
        parse_overrides(["ray.num_cpus_per_actor=2", "output_options.compressor='zstd'", "output_options.level=22"])
    )
    assert spec.ray.num_cpus_per_actor == 2.0 and isinstance(spec.ray.num_cpus_per_actor, float)
    assert spec.output_options.level == 22


def test_weights_checked_against_the_job(tmp_path) -> None:  # type: ignore[no-untyped-def]
    untrained_demo_weights(cache_dir=tmp_path).check_job()
    with pytest.raises(CheckpointError, match="takes 4 input channels"):
        check_config_for_job({"in_channels": 4, "out_channels": 31}, "w.pt")
    with pytest.raises(CheckpointError, match="gives 16 bands"):
        check_config_for_job({"in_channels": 3, "out_channels": 16}, "w.pt")


def test_errors_wrapping_a_remote_traceback_are_one_clean_line() -> None:
    class RemoteError(Exception):  # the shape of ray.exceptions.RayTaskError: coloured traceback + cause
        def __init__(self, cause: BaseException) -> None:
            super().__init__("\x1b[36mray::Actor.run()\x1b[39m\nTraceback (most recent call last):\n  File ...\n" * 40)
            self.cause = cause

    text = storage.describe_error(RemoteError(ValueError("weights w.pt: expected 3 channels")))
    assert text == "ValueError: weights w.pt: expected 3 channels"
    long = storage.describe_error(RuntimeError("\x1b[31mx\x1b[0m " * 1000))
    assert "\x1b" not in long and "\n" not in long and len(long) <= 600
