"""Catalog, lease and planner without Ray: accumulate, atomic replace, one run per output, skip decisions."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from pipeline import catalog, lease
from pipeline.catalog import CatalogRow, merge, read_catalog, write_catalog
from pipeline.config import OutputSpec
from pipeline.incremental import ChunkCounts, expected_chunks, plan_archive, plan_refs, stat_sources
from pipeline.sources import ImageRef, list_members

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def _row(key: str, **kw: object) -> CatalogRow:
    base = dict(input=key, cube_url=f"file:///o/cubes.zarr/{key}", group=key, source="file:///in/a.tar", run_id="r1")
    return CatalogRow(**(base | kw))  # type: ignore[arg-type]


def test_catalog_accumulates_and_reads_with_pandas_and_duckdb(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert read_catalog(out) == {}
    first = {r.input: r for r in [_row("a", shape=(31, 8, 9), completed=NOW), _row("b")]}
    write_catalog(out, first)
    second = merge(read_catalog(out), [_row("b", run_id="r2"), _row("c", run_id="r2")])
    write_catalog(out, second)
    rows = read_catalog(out)
    assert sorted(rows) == ["a", "b", "c"] and rows["a"].run_id == "r1" and rows["b"].run_id == "r2"
    assert rows["a"].shape == (31, 8, 9) and rows["a"].completed == NOW
    path = tmp_path / "out" / catalog.CATALOG_PATH
    assert list(pd.read_parquet(path)["input"]) == ["a", "b", "c"]
    assert duckdb.sql(f"SELECT count(*) FROM '{path}' WHERE run_id = 'r2'").fetchall() == [(2,)]


def test_a_writer_killed_mid_write_leaves_the_previous_catalog_readable(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    write_catalog(out, [_row("a"), _row("b")])
    # A real process, killed with SIGKILL while its write is half done (the file write stalls after
    # half the bytes): the temp file is never renamed into place.
    script = textwrap.dedent(
        f"""
        import builtins, io, sys, time
        from pipeline.catalog import CatalogRow, write_catalog
        real_open = builtins.open
        class Stalling(io.FileIO):
            def write(self, b):
                n = super().write(bytes(b)[: len(b) // 2]); self.flush()
                print("half", flush=True); time.sleep(60); return n
        builtins.open = lambda p, m="r", *a, **k: Stalling(p, "wb") if "wb" in m else real_open(p, m, *a, **k)
        rows = [CatalogRow(input=f"x{{i}}", cube_url="u", group="g", source="s") for i in range(500)]
        write_catalog({out!r}, rows)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "half"
    proc.kill()
    proc.wait()
    assert sorted(read_catalog(out)) == ["a", "b"]
    assert any(p.name.startswith("catalog.parquet.tmp-") for p in (tmp_path / "out" / "catalog").iterdir())


def test_plan_skips_unchanged_and_redoes_changed_new_and_other_fingerprints() -> None:
    refs = [ImageRef(f"/in/{k}.png", None, "file", version=v) for k, v in [("k1", "v1"), ("k2", "CHANGED"), ("k3", "v3")]]
    cat = {
        refs[0].key: _row(refs[0].key, source_version="v1", fingerprint="f"),
        refs[1].key: _row(refs[1].key, source_version="v2", fingerprint="f"),
        refs[2].key: _row(refs[2].key, source_version="v3", fingerprint="old"),
    }
    new = ImageRef("/in/new.png", None, "file", version="n")
    plan = plan_refs([*refs, new, ImageRef("file:///in/../in/new.png", None, "file", version="n")], cat, "f")
    assert [r.input for r in plan.unchanged] == [refs[0].key]
    assert [r.key for r in plan.todo] == [refs[1].key, refs[2].key, new.key]  # the second spelling is dropped


def test_an_unchanged_archive_is_skipped_whole_only_when_complete() -> None:
    rows = [_row(f"m{i}", archive_version="A", archive_images=2, fingerprint="f") for i in range(2)]
    assert plan_archive("/in/a.tar", "A", rows, "f") == rows
    assert plan_archive("/in/a.tar", "B", rows, "f") is None  # archive changed: list its headers
    assert plan_archive("/in/a.tar", "A", rows[:1], "f") is None  # an image missing (it failed last time)
    assert plan_archive("/in/a.tar", "A", rows, "g") is None
    assert plan_archive("/in/a.tar", None, rows, "f") is None


def test_a_tar_rebuilt_with_a_new_member_first_keeps_the_others_identity(tmp_path: Path) -> None:
    def build(names: list[str]) -> None:
        with tarfile.open(tmp_path / "a.tar", "w") as tf:
            for name in names:
                info = tarfile.TarInfo(name)
                data = name.encode() * 50
                info.size, info.mtime = len(data), 1_700_000_000
                tf.addfile(info, io.BytesIO(data))

    build(["a.png", "b.png"])
    before, _ = list_members(str(tmp_path / "a.tar"), "tar")
    cat = {r.key: _row(r.key, source_version=r.version, fingerprint="f") for r in before}
    build(["new.png", "a.png", "b.png"])
    after, _ = list_members(str(tmp_path / "a.tar"), "tar")
    plan = plan_refs(after, cat, "f")
    assert [r.member for r in plan.todo] == ["new.png"] and len(plan.unchanged) == 2


def test_stat_sources_lists_each_folder_once_and_sees_changes(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"x" * (i + 1))
    urls = [str(tmp_path / f"{i}.png") for i in range(3)]
    first = stat_sources(urls)
    assert len(set(first.values())) == 3 and all(v and v.startswith(f"{i + 1}:") for i, v in enumerate(first.values()))
    time.sleep(0.01)
    (tmp_path / "1.png").write_bytes(b"yy")
    second = stat_sources(urls)
    assert second[urls[0]] == first[urls[0]] and second[urls[1]] != first[urls[1]]


def test_chunk_counts_come_from_one_listing_and_find_missing_chunks(tmp_path: Path) -> None:
    root = tmp_path / "out" / "cubes.zarr" / "a.tar" / "img-1" / "cube" / "c" / "0"
    for y in range(2):
        for x in range(3):
            (root / str(y)).mkdir(parents=True, exist_ok=True)
            (root / str(y) / str(x)).write_bytes(b"c")
    spec = OutputSpec(chunk=64)
    n = expected_chunks(100, 130, spec)
    assert n == 6
    good = _row("k", group="a.tar/img-1", chunks=n)
    assert ChunkCounts(str(tmp_path / "out")).intact(good)
    (root / "1" / "2").unlink()
    assert not ChunkCounts(str(tmp_path / "out")).intact(good)


# --- lease ----------------------------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder_and_released_leases_are_free(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with lease.hold_lease(out, "run-A", settle_s=0) as held:
        assert lease.read_lease(out) is not None and held.run_id == "run-A"
        with pytest.raises(lease.LeaseHeldError, match=r"run run-A on .*\(pid \d+\)"):
            lease.acquire(out, "run-B", settle_s=0)
    assert lease.read_lease(out) is None
    with lease.hold_lease(out, "run-B", settle_s=0):
        pass


def test_wait_waits_for_the_holder_and_an_expired_lease_is_taken_over(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a = lease.acquire(out, "run-A", ttl_s=30, settle_s=0)
    threading.Timer(0.5, a.release).start()
    t0 = time.monotonic()
    b = lease.acquire(out, "run-B", wait_s=10, settle_s=0, poll_s=0.1)
    assert time.monotonic() - t0 >= 0.4 and b.run_id == "run-B"
    b._stop.set()  # run-B stalls: no more heartbeats
    time.sleep(0.3)
    c = lease.acquire(out, "run-C", ttl_s=30, settle_s=0) if _expire(out) else None
    assert c is not None and lease.read_lease(out).run_id == "run-C"  # type: ignore[union-attr]
    assert not b.renew() and b.lost  # run-B finds it lost, and stops
    c.release()


def _expire(out: str) -> bool:
    """Age the current lease past its expiry (as if its holder stopped beating long ago)."""
    import dataclasses
    import json

    rec = lease.read_lease(out)
    assert rec is not None
    path = Path(out) / lease.LEASE_PATH
    path.write_text(json.dumps(dataclasses.asdict(rec) | {"expires": time.time() - 1}))
    return True


def test_two_racing_writers_on_a_store_without_conditional_writes_get_one_winner(tmp_path: Path) -> None:
    import fsspec

    out = f"memory://{tmp_path.name}-race"
    fs = fsspec.filesystem("memory")
    real = fs.pipe_file

    def unconditional(path: str, value: bytes, mode: str = "overwrite", **kw: object) -> None:
        real(path, value, **kw)  # a server that ignores If-None-Match

    fs.pipe_file = unconditional  # type: ignore[method-assign]
    won: list[str] = []
    errors: list[str] = []

    def take(run: str) -> None:
        try:
            won.append(lease.acquire(out, run, settle_s=0.3).run_id)
        except lease.LeaseHeldError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=take, args=(r,)) for r in ("run-A", "run-B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    del fs.pipe_file
    assert len(won) == 1 and len(errors) == 1


def test_the_cli_refuses_a_second_run_with_exit_1_naming_the_holder_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import execution
    from pipeline.cli import main

    started: list[str] = []  # whether the CLI got as far as starting (or joining) Ray
    monkeypatch.setattr(execution, "init_ray", lambda *a, **k: started.append("init_ray"))
    out = str(tmp_path / "out")
    (tmp_path / "a.png").write_bytes(b"not read")
    with lease.hold_lease(out, "nightly-1", settle_s=0):
        rc = main(["run", "--input", str(tmp_path / "a.png"), "--output", out, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "is in use by run nightly-1 on" in err and "--wait" in err
    assert started == []


def test_a_run_never_marks_complete_a_cube_another_run_recreated(tmp_path: Path) -> None:
    from pipeline import cubes

    store = cubes.open_cubes(str(tmp_path))
    cubes.create_cube(
        store, "g", height=4, width=4, bands_nm=[400.0, 500.0], spec=OutputSpec(chunk=4), provenance={"job": {"run_id": "run-B"}}
    )
    with pytest.raises(cubes.ForeignGroupError, match="belongs to run run-B"):
        cubes.mark_complete(store, "g", {}, run_id="run-A")
    assert cubes.read_status(store, "g")["complete"] is False  # type: ignore[index]
    cubes.mark_complete(store, "g", {}, run_id="run-B")
    assert cubes.read_status(store, "g")["complete"] is True  # type: ignore[index]


def test_a_lease_whose_holder_process_is_gone_is_taken_over_at_once(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    holder = subprocess.run(
        [sys.executable, "-c", f"from pipeline.lease import acquire; acquire({out!r}, 'killed-run', settle_s=0)"],
        check=True,
    )
    assert holder.returncode == 0 and lease.read_lease(out).run_id == "killed-run"  # type: ignore[union-attr]
    taken = lease.acquire(out, "next-run", settle_s=0)  # same machine and PID namespace, holder pid gone
    assert lease.read_lease(out).run_id == "next-run"  # type: ignore[union-attr]
    taken.release()


def test_a_run_that_lost_its_lease_is_told_before_it_records_anything(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a = lease.acquire(out, "run-A", settle_s=0)
    a.check()  # still ours
    _expire(out)
    b = lease.acquire(out, "run-B", settle_s=0)
    with pytest.raises(lease.LeaseHeldError, match="run-A lost the output's lease to run run-B"):
        a.check()
    a._stop.set()
    b.release()
