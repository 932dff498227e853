"""The bad-input corpus through the whole pipeline, and the pipeline's security properties (issue 5).

``tests/fixtures/make_bad_inputs.make_corpus`` documents each case's outcome at the sources/decode level
(``tests/unit/test_bad_inputs.py``). At the pipeline level the manifest differs in one way: a rejected archive
entry (unsafe name, link, FIFO, nested archive, directory named like an image) is a ``failed`` row
(``error_type = RejectedMember``) — something the user asked for was not converted — except ``not an image
extension``, which stays ``skipped``; an archive without images is one ``skipped`` row. :func:`pipeline_expect`
is that mapping; RELIABILITY.md lists both levels.

Security: archive member names never write outside the output prefix; weights load weights-only and only
with a matching hash; Pillow's decompression-bomb guard is on; no secret reaches the manifest, the zarr
attributes or the logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
from fixtures.make_bad_inputs import CASE_NAMES, LOCAL_ONLY, Case, Expect, make_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fault_helpers as fh  # noqa: E402

from pipeline.storage import open_fs, readable  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Cases an S3 bucket can hold (keys are UTF-8); the rest run from a local folder (test_hostile_input.py).
S3_CASE_NAMES = tuple(n for n in CASE_NAMES if n not in LOCAL_ONLY)
#: A session token the CLI run sends (rclone ignores it): it must not reach the -vv logs either.
SESSION_TOKEN = "FQoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789abcdef"


def pipeline_expect(e: Expect) -> tuple[str | None, str, str]:
    """A corpus expectation at the pipeline level: ``(member, status, reason substring)``."""
    if e.status == "skipped" and e.member is not None and "not an image extension" not in e.reason:
        return (e.member, "failed", e.reason)
    return (e.member, e.status, e.reason)


@pytest.fixture(scope="module")
def corpus_run(s3_server, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The corpus in a bucket, run once with the CLI (its own local Ray, -v logs captured)."""
    if not s3_server.is_running:
        s3_server.start()
    corpus_dir = tmp_path_factory.mktemp("corpus")
    cases = [c for c in make_corpus(corpus_dir, seed=0) if c.name not in LOCAL_ONLY]
    name = f"bad-{uuid.uuid4().hex[:10]}"
    url = s3_server.create_bucket(name)
    fs, _ = open_fs(url, s3_server.storage_options())
    for case in cases:
        fs.pipe_file(f"{name}/in/{case.path.name}", case.path.read_bytes())
    storage = {
        "endpoint_url": s3_server.endpoint_url,
        "key_env": "AWS_ACCESS_KEY_ID",
        "secret_env": "AWS_SECRET_ACCESS_KEY",
        "token_env": "AWS_SESSION_TOKEN",
        "region": "us-east-1",
    }
    spec = tmp_path_factory.mktemp("spec") / "job.toml"
    from pipeline.config import JobSpec

    spec.write_text(
        JobSpec.from_dict(
            {
                "name": "bad-inputs",
                "inputs": [f"{url}/in/"],
                "output": f"{url}/out",
                "storage": storage,
                "tiling": {"max_tile_pixels": 1024, "tile_core": 16, "halo": 8},
                "output_options": {"chunk": 16},
            }
        ).to_toml()
    )
    # -vv: botocore, s3fs and urllib3 debug lines (headers, signatures) go through the CLI's redacting filter.
    cli = f"{fh.PYTHON} -m pipeline.cli -vv run --spec {spec} --num-cpus 2 --no-progress --json"
    env = fh.ray_env(s3_server.env() | {"AWS_SESSION_TOKEN": SESSION_TOKEN})
    proc = subprocess.run(fh.isolated(cli, net=False), env=env, capture_output=True, text=True, timeout=300)
    fs.invalidate_cache()
    with fs.open(f"{name}/out/manifest/manifest.parquet", "rb") as f:
        rows = pq.read_table(f).to_pylist()
    return SimpleNamespace(
        cases=cases, url=url, name=name, fs=fs, proc=proc, rows=rows, server=s3_server, corpus_dir=corpus_dir
    )


def test_exit_code_and_summary(corpus_run) -> None:  # type: ignore[no-untyped-def]
    assert corpus_run.proc.returncode == 2, corpus_run.proc.stderr[-3000:]  # 2: some inputs failed
    summary = json.loads(corpus_run.proc.stdout)
    by_status = {s: sum(r["status"] == s for r in corpus_run.rows) for s in ("ok", "failed", "skipped")}
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (
        by_status["ok"],
        by_status["failed"],
        by_status["skipped"],
    )
    print(f"\n[figures] bad-input corpus: {len(S3_CASE_NAMES)} cases, {len(corpus_run.rows)} rows: {by_status}")
    # The 1 GiB zip member (and the 20 × 100 MiB overlapping zip) are refused from their headers: no process
    # of the run comes near 1 GB (issue 15).
    peaks = summary["peak_rss"]
    print(f"[figures] peak RSS (MB): { {k: round(v / 1e6) for k, v in peaks.items()} }")
    assert set(peaks) == {"driver", "prepare", "actor"} and all(0 < v < 1e9 for v in peaks.values()), peaks


@pytest.mark.parametrize("name", S3_CASE_NAMES)
def test_case_outcome(name: str, corpus_run) -> None:  # type: ignore[no-untyped-def]
    case: Case = next(c for c in corpus_run.cases if c.name == name)

    def group_json(group: str) -> dict[str, Any]:
        return json.loads(corpus_run.fs.cat_file(f"{corpus_run.name}/out/cubes.zarr/{group}/zarr.json"))

    check_case(case, corpus_run.rows, f"{corpus_run.url}/in/{case.path.name}", group_json)


def check_case(case: Case, rows: list[dict[str, Any]], source: str, group_json: Any) -> None:
    """The manifest rows of ``source`` are exactly the case's documented outcome, each message one clean line
    naming the input; ``group_json(group)`` reads an ok row's group metadata."""
    # Stable sorts: duplicate member names keep archive order (the manifest is sorted by input = ...@index).
    got = sorted(
        (((r["member"], r["status"]), r) for r in rows if r["source"] == source),
        key=lambda x: (x[0][0] or "", x[0][1]),
    )
    want = sorted(((pipeline_expect(e), e) for e in case.expected), key=lambda x: (x[0][0] or "", x[0][1]))
    assert [k for k, _ in got] == [w[:2] for w, _ in want], case.description
    for (_, row), ((_, _, reason), e) in zip(got, want, strict=True):
        assert reason.lower() in (row["error"] or "").lower(), (case.name, row)
        if row["status"] == "ok":
            if e.shape is not None:
                assert (row["height"], row["width"]) == e.shape, (case.name, row)
            meta = group_json(row["group"])
            assert meta["attributes"]["complete"] == 1
            if e.bit_depth is not None:
                assert json.loads(meta["attributes"]["drcr_pipeline"])["source"]["bit_depth"] == e.bit_depth, (case.name, row)
        else:
            assert row["error_type"], row
            error = row["error"] or ""
            assert "\n" not in error and "\x1b" not in error and "Traceback" not in error, row
            if row["status"] == "failed":  # messages name the input
                assert (row["member"] or readable(case.path.name)) in error, row


def test_every_row_once_and_nothing_outside_the_prefix(corpus_run) -> None:  # type: ignore[no-untyped-def]
    rows = corpus_run.rows
    assert len({r["input"] for r in rows}) == len(rows) == sum(len(c.expected) for c in corpus_run.cases)
    fs, name = corpus_run.fs, corpus_run.name
    fs.invalidate_cache()
    everything = fs.find(name)
    out = f"{name}/out/"
    known = (f"{name}/in/", *(out + d for d in ("cubes.zarr/", "manifest/", "catalog/", "previews/", "stac/", "report.html")))
    outside = [p for p in everything if not p.startswith(known)]
    assert outside == []
    groups = {r["group"] for r in rows if r["group"]}
    assert all(".." not in g.split("/") and not g.startswith("/") for g in groups)
    # The unsafe members got no group at all, and nothing landed beside the S3 server's bucket directories.
    assert all(r["group"] is None for r in rows if r["member"] and (".." in r["member"] or r["member"].startswith("/")))
    assert not any(p.name in ("escape.png", "up.png", "root.png") for p in corpus_run.server.root.rglob("*"))


def test_no_secret_in_outputs_or_logs(corpus_run) -> None:  # type: ignore[no-untyped-def]
    fs, name, server = corpus_run.fs, corpus_run.name, corpus_run.server
    secrets = [server.secret.encode(), server.key.encode(), SESSION_TOKEN.encode()]
    for path in fs.find(f"{name}/out"):
        data = fs.cat_file(path)
        assert not any(s in data for s in secrets), path
    logs = corpus_run.proc.stdout + corpus_run.proc.stderr
    # There were botocore debug lines to search, signed requests among them (redacted, not dropped).
    assert "DEBUG botocore" in logs and "Authorization" in logs and "***" in logs, logs[-2000:]
    for secret in (server.secret, server.key, SESSION_TOKEN):
        assert secret not in logs


def test_local_run_writes_only_under_the_output(ray_local, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The corpus from a local folder to a local output: every file written is under output/cubes.zarr,
    manifest, catalog, previews, stac or is output/report.html; the input folder is unchanged; nothing appears beside the output."""
    from pipeline.config import JobSpec
    from pipeline.execution import run_job

    cases = make_corpus(tmp_path / "in", seed=0)
    before = {p: p.read_bytes() for p in (tmp_path / "in").rglob("*") if p.is_file()}
    out = tmp_path / "work" / "out"
    spec = JobSpec.from_dict(
        {
            "name": "bad-local",
            "inputs": [str(tmp_path / "in")],
            "output": str(out),
            "tiling": {"max_tile_pixels": 1024, "tile_core": 16, "halo": 8},
            "output_options": {"chunk": 16},
        }
    )
    summary = run_job(spec)
    assert summary.ok + summary.failed + summary.skipped == sum(len(c.expected) for c in cases)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in before]
    places = [out / d for d in ("cubes.zarr", "manifest", "catalog", "previews", "stac", "report.html")]
    assert written and all(any(p.is_relative_to(d) for d in places) for p in written), written
    assert {p: p.read_bytes() for p in (tmp_path / "in").rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["in", "work"] and os.listdir(tmp_path / "work") == ["out"]
    assert not Path("/abs").exists()


def _cli(argv: list[str], capsys: Any) -> tuple[int, str]:
    from pipeline.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_wrong_weights_hash_refused(ray_local, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from drcr_model.weights import untrained_demo_weights
    from pipeline.sample import make_sample

    w = untrained_demo_weights(cache_dir=tmp_path / "w")
    make_sample(tmp_path / "in", count=1)
    wrong = "0" * 64
    rc, text = _cli(
        [
            "run",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--weights",
            w.url,
            "--set",
            f"weights.sha256={wrong!r}".replace("'", '"'),
            "--no-progress",
        ],
        capsys,
    )
    assert rc == 1, text
    assert "sha256" in text and wrong in text and "refusing to load" in text, text
    # no cube, no manifest: at most the empty folder the (released) lease was taken in
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    rc, text = _cli(
        [
            "run",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "ok"),
            "--weights",
            w.url,
            "--set",
            f'weights.sha256="{w.sha256}"',
            "--no-progress",
        ],
        capsys,
    )
    assert rc == 0, text


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {os.environ.get('DRCR_EVIL_MARKER', '/nonexistent/x')}",))


def test_pickled_code_in_weights_never_runs(ray_local, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch

    from drcr_model.weights import untrained_demo_weights
    from pipeline.sample import make_sample

    marker = tmp_path / "pwned"
    monkeypatch.setenv("DRCR_EVIL_MARKER", str(marker))
    good = torch.load(untrained_demo_weights(cache_dir=tmp_path / "w").url, weights_only=True)
    torch.save({"state_dict": good, "payload": _Evil()}, tmp_path / "evil.pt")
    make_sample(tmp_path / "in", count=1)
    rc, text = _cli(
        [
            "run",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--weights",
            str(tmp_path / "evil.pt"),
            "--no-progress",
        ],
        capsys,
    )
    assert rc == 1 and "weights-only" in text, text
    assert not marker.exists()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # the released lease leaves no file


def test_pillow_bomb_guard_is_on() -> None:
    from PIL import Image

    import pipeline.decode  # noqa: F401 - importing the decoder must not lift the guard

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 2**28
