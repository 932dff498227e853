"""Issue 15: hostile input and hostile environments, each through the CLI (and the real S3 server where the
case involves storage). The corpus cases (names, size bombs, broken tars, EPS) run in
``test_bad_input_pipeline.py`` from S3; here the same corpus runs from a local folder with links pointing out of
it, and the cases that are about the job rather than one input: errors that must be one line and exit 1,
storage that refuses or never answers, HTTP inputs, group collisions, wrong weights, Ray's listening sockets.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
from fixtures.make_bad_inputs import CASE_NAMES, make_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fault_helpers as fh  # noqa: E402
from test_bad_input_pipeline import check_case  # noqa: E402

pytestmark = [pytest.mark.integration]

TINY = ["--set", "tiling.max_tile_pixels=1024", "--set", "tiling.tile_core=16", "--set", "tiling.halo=8"]
TINY += ["--set", "output_options.chunk=16"]


def _cli(argv: list[str], capsys: Any) -> tuple[int, str]:
    """The CLI in this process (its Ray is the session's ``ray_local`` where one is needed)."""
    from pipeline.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _one_error_line(text: str) -> str:
    """The CLI's error: exactly one ``drcr-pipeline: error:`` line and no traceback."""
    lines = [ln for ln in text.splitlines() if ln.startswith("drcr-pipeline: error:")]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (6, 5), (10, 200, 30)).save(path)
    return path


# --- the corpus from a local folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The whole corpus (non-UTF-8 file name included) in a local folder beside links out of it, run by the
    CLI with its own local Ray, to a local output. The environment does not pre-set Ray's loopback switch:
    the CLI must."""
    root = tmp_path_factory.mktemp("hostile")
    cases = make_corpus(root / "in", seed=0)
    outside = root / "outside"
    outside.mkdir()
    _png(outside / "private.png")
    os.symlink(outside / "private.png", root / "in" / "link_out.png")
    os.symlink(outside, root / "in" / "linked_folder")
    out = root / "out"
    env = fh.ray_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    cli = f"{fh.PYTHON} -m pipeline.cli run --input {root / 'in'} --output {out} --num-cpus 2 --no-progress --json "
    cli += " ".join(TINY)
    proc = subprocess.run(fh.isolated(cli, net=False), env=env, capture_output=True, text=True, timeout=300)
    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    return SimpleNamespace(root=root, cases=cases, out=out, proc=proc, rows=rows)


def test_local_corpus_exit_code(local_run) -> None:  # type: ignore[no-untyped-def]
    assert local_run.proc.returncode == 2, local_run.proc.stderr[-3000:]
    summary = json.loads(local_run.proc.stdout)
    assert all(0 < v < 1e9 for v in summary["peak_rss"].values()), summary["peak_rss"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_local_case_outcome(name: str, local_run) -> None:  # type: ignore[no-untyped-def]
    case = next(c for c in local_run.cases if c.name == name)

    def group_json(group: str) -> dict[str, Any]:
        return json.loads((local_run.out / "cubes.zarr" / group / "zarr.json").read_text())

    from pipeline.storage import readable

    check_case(case, local_run.rows, readable(str(case.path)), group_json)


def test_links_out_of_the_folder_are_not_followed(local_run) -> None:  # type: ignore[no-untyped-def]
    rows = {Path(r["source"]).name: r for r in local_run.rows if r["member"] is None}
    for name in ("link_out.png", "linked_folder"):
        assert rows[name]["status"] == "failed", rows[name]
        assert "symbolic link out of the input folder" in rows[name]["error"], rows[name]
    assert not any("private" in (r["source"] or "") for r in local_run.rows)
    assert not any("private" in p.name for p in (local_run.out / "cubes.zarr").rglob("*"))


def test_group_names_readable_short_and_never_hidden(local_run) -> None:  # type: ignore[no-untyped-def]
    groups = [r["group"] for r in local_run.rows if r["status"] == "ok"]
    parts = [p for g in groups for p in g.split("/")]
    assert all(len(p.encode()) <= 255 and not p.startswith((".", "_")) for p in parts), parts
    assert any(g.startswith("DongJing.png/") or g.startswith("DongJing.png-") for g in groups), groups
    # 64-bit digests ending every group, unique per input
    assert all(len(g.rsplit("-", 1)[1]) == 16 for g in groups) and len(set(groups)) == len(groups)
    # The 120 + 246 character member is a readable, shortened path; its cube is complete.
    long = next(r for r in local_run.rows if r["member"] and len(r["member"]) > 300)
    assert long["status"] == "ok" and long["group"].startswith("long_name.tar/ddd"), long


def test_non_utf8_names_recorded_readable(local_run) -> None:  # type: ignore[no-untyped-def]
    names = {r["member"] or Path(r["source"]).name for r in local_run.rows if r["status"] == "ok"}
    assert "caf\\xe9.png" in names and "caf\\xe9 local.png" in names, sorted(names)
    record = next(r for r in local_run.rows if r["member"] == "caf\\xe9.png")
    attrs = json.loads((local_run.out / "cubes.zarr" / record["group"] / "zarr.json").read_text())["attributes"]
    assert json.loads(attrs["drcr_pipeline"])["source"]["member"] == "caf\\xe9.png"


# --- one-line errors before any work -------------------------------------------------------------------------


def test_credentials_in_a_url_refused(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = "s3://AKIAHOSTILEKEY0001:hostileSecretValue123@bucket/in/a.png"
    rc, text = _cli(["run", "--input", url, "--output", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 1
    line = _one_error_line(text)
    assert "carries credentials in the URL" in line and "inputs[0]" in line, line
    assert "AKIAHOSTILEKEY0001" not in text and "hostileSecretValue123" not in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ray.actors=1.9", "ray.actors = 1.9: expected int"),
        ("ray.actors=true", "ray.actors = True: expected int"),
        ("inference.channels_last=1", "inference.channels_last = 1: expected bool"),
        ("tiling.halo=8.0", "tiling.halo = 8.0: expected int"),
        ("output_options.level=22", "must be in 0..9 for blosc-zstd"),
        ("ray.num_cpus_per_actor=nan", "must be a finite number"),
    ],
)
def test_strict_spec_types(override: str, message: str, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, text = _cli(["show-spec", "--input", "x.png", "--output", str(tmp_path), "--set", override], capsys)
    assert rc == 1 and message in _one_error_line(text), text


def test_strict_types_in_a_spec_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "job.toml"
    spec.write_text('inputs = ["x.png"]\noutput = "out"\n[ray]\nactors = 1.9\n')
    rc, text = _cli(["show-spec", "--spec", str(spec)], capsys)
    assert rc == 1 and "ray.actors = 1.9: expected int" in _one_error_line(text), text


def test_output_equal_to_an_input_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    image = _png(tmp_path / "a.png")
    before = image.read_bytes()
    rc, text = _cli(["run", "--input", str(image), "--output", str(image), "--no-progress"], capsys)
    assert rc == 1 and "is an existing file" in _one_error_line(text), text
    assert image.read_bytes() == before


def _s3_spec(tmp_path: Path, server: Any, inputs: list[str], output: str, **storage: Any) -> Path:
    from pipeline.config import JobSpec

    section = {
        "endpoint_url": server.endpoint_url,
        "key_env": "AWS_ACCESS_KEY_ID",
        "secret_env": "AWS_SECRET_ACCESS_KEY",
    }
    spec = JobSpec.from_dict({"inputs": inputs, "output": output, "storage": section | storage})
    path = tmp_path / "job.toml"
    path.write_text(spec.to_toml())
    return path


def test_output_bucket_missing(s3_bucket, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    from pipeline.storage import open_fs

    fs, _ = open_fs(s3_bucket.url, s3_bucket.storage_options)
    fs.pipe_file(f"{s3_bucket.name}/in/a.png", _png(tmp_path / "a.png").read_bytes())
    spec = _s3_spec(tmp_path, s3_bucket.server, [f"{s3_bucket.url}/in/"], "s3://no-such-bucket-hostile/out")
    rc, text = _cli(["run", "--spec", str(spec), "--no-progress"], capsys)
    line = _one_error_line(text)
    assert rc == 1 and "s3://no-such-bucket-hostile/out" in line and "bucket does not exist" in line, line


def test_refused_endpoint_fails_fast(tmp_path, capsys, s3_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _s3_spec(tmp_path, s3_server, ["s3://b/in/"], "s3://b/out")
    spec.write_text(spec.read_text().replace(s3_server.endpoint_url, f"http://127.0.0.1:{port}"))
    t0 = time.perf_counter()
    rc, text = _cli(["run", "--spec", str(spec), "--no-progress"], capsys)
    elapsed = time.perf_counter() - t0
    line = _one_error_line(text)
    assert rc == 1 and "s3://b/out" in line and "unreachable" in line, line
    print(f"\n[figures] refused endpoint: exit 1 after {elapsed:.1f} s")
    assert s3_server.secret not in text


def test_silent_endpoint_hits_the_deadline(tmp_path, capsys, s3_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An endpoint that accepts connections and never answers: exit 1 once storage.deadline_s has passed."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        spec = _s3_spec(tmp_path, s3_server, ["s3://b/in/"], "s3://b/out", deadline_s=3)
        spec.write_text(spec.read_text().replace(s3_server.endpoint_url, url))
        t0 = time.perf_counter()
        rc, text = _cli(["run", "--spec", str(spec), "--no-progress"], capsys)
        elapsed = time.perf_counter() - t0
    line = _one_error_line(text)
    assert rc == 1 and "no answer within 3 s" in line and "storage.deadline_s" in line, line
    assert 2.5 < elapsed < 15, elapsed
    print(f"\n[figures] silent endpoint: exit 1 after {elapsed:.1f} s (deadline 3 s)")


# --- through a real local Ray (the session's) ----------------------------------------------------------------


def test_mistyped_input_leaves_the_output_alone(ray_local, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    _png((tmp_path / "in").mkdir() or tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    rc, text = _cli(["run", "--input", str(tmp_path / "in"), "--output", str(out), "--no-progress", *TINY], capsys)
    assert rc == 0, text
    root = out / "cubes.zarr" / "zarr.json"
    before = root.read_bytes()
    assert json.loads(before)["attributes"]["drcr_pipeline_run"]["status"] == "finished"
    rc, text = _cli(["run", "--input", str(tmp_path / "typo"), "--output", str(out), "--no-progress"], capsys)
    assert rc == 1 and "matches nothing" in _one_error_line(text), text
    assert root.read_bytes() == before  # the last run's summary is kept, the root is not marked running


def test_four_channel_weights_fail_the_job(ray_local, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import torch

    from drcr_model.net import DRCRNet

    torch.save(DRCRNet(in_channels=4, out_channels=31, channels=8, n_blocks=1).state_dict(), tmp_path / "w4.pt")
    _png((tmp_path / "in").mkdir() or tmp_path / "in" / "a.png")
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"]
    rc, text = _cli([*argv, "--weights", str(tmp_path / "w4.pt")], capsys)
    line = _one_error_line(text)
    assert rc == 1 and "w4.pt" in line and "takes 4 input channels" in line and "\x1b" not in text, text
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # the released lease leaves no file
    torch.save(DRCRNet(in_channels=3, out_channels=16, channels=8, n_blocks=1).state_dict(), tmp_path / "b16.pt")
    rc, text = _cli([*argv, "--weights", str(tmp_path / "b16.pt")], capsys)
    assert rc == 1 and "gives 16 bands, but the job needs 31" in _one_error_line(text), text


def test_group_of_another_input_is_never_overwritten(ray_local, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A group whose recorded owner is another input (what a digest collision looks like): refused, kept."""
    import zarr

    from pipeline import cubes

    image = _png((tmp_path / "in").mkdir() or tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    from pipeline.sources import ImageRef

    group = cubes.group_path(str(image), None, ImageRef(str(image), None, "file").key)
    store = cubes.open_cubes(str(out))
    zarr.create_group(store, path=group, attributes={"complete": True, cubes.ATTR: {"source": {"key": "other!x@0"}}})
    before = (out / "cubes.zarr" / group / "zarr.json").read_bytes()
    rc, text = _cli(["run", "--input", str(image), "--output", str(out), "--no-progress", *TINY], capsys)
    assert rc == 2, text
    (row,) = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    assert row["status"] == "failed" and row["error_type"] == "GroupCollisionError", row
    assert "collides with the cube of 'other!x@0'" in row["error"] and str(image) in row["error"], row
    assert (out / "cubes.zarr" / group / "zarr.json").read_bytes() == before


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that honours ``Range: bytes=a-b`` (as real HTTP servers and CDNs do; the
    standard library's does not): tar members are read as byte ranges."""

    def send_head(self):  # type: ignore[no-untyped-def]
        spec = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not spec.startswith("bytes=") or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        first, _, last = spec[len("bytes=") :].partition("-")
        start = int(first) if first else max(0, len(data) - int(last))
        end = min(int(last), len(data) - 1) if first and last else len(data) - 1
        body = data[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def http_folder(tmp_path):  # type: ignore[no-untyped-def]
    """A local HTTP server on 127.0.0.1 serving a folder with one PNG and a tar of two."""
    import tarfile

    folder = tmp_path / "www"
    folder.mkdir()
    _png(folder / "photo.png")
    with tarfile.open(folder / "pair.tar", "w") as tf:
        for name in ("x.png", "y.png"):
            tf.add(_png(tmp_path / name), arcname=name)
    handler = functools.partial(_RangeHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_inputs(ray_local, http_folder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    inputs = ["--input", f"{http_folder}/photo.png", "--input", f"{http_folder}/pair.tar"]
    rc, text = _cli(["run", *inputs, "--output", str(out), "--no-progress", *TINY], capsys)
    assert rc == 0, text
    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    assert sorted((r["member"] or "", r["status"]) for r in rows) == [("", "ok"), ("x.png", "ok"), ("y.png", "ok")], rows


# --- Ray on loopback -----------------------------------------------------------------------------------------

_PROBE = """
import json, sys, psutil
from pipeline.cli import main
rc = main(sys.argv[1:])
import ray  # after the CLI started its local Ray: this process must not import it first
@ray.remote
def where():
    return ray.util.get_node_ip_address()
me = psutil.Process()
pids = {p.pid for p in [me, *me.children(recursive=True)]}
listening = sorted({c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids})
nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
print(json.dumps({"rc": rc, "task": ray.get(where.remote()), "listening": listening, "nodes": nodes}))
"""


def test_local_ray_listens_on_loopback_only(tmp_path) -> None:
    """The CLI's local Ray, started from an environment that does not set Ray's loopback switch: every socket
    of every Ray process listens on loopback, and tasks report 127.0.0.1."""
    _png((tmp_path / "in").mkdir() or tmp_path / "in" / "a.png")
    env = fh.ray_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress", *TINY]
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    cmd = f"{fh.PYTHON} {probe} {' '.join(argv)}"
    proc = subprocess.run(fh.isolated(cmd, net=False), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n[figures] local Ray listening on: {report['listening']}")
    assert report["rc"] == 0 and report["task"] == "127.0.0.1" and report["nodes"] == ["127.0.0.1"], report
    assert report["listening"] and set(report["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, report
