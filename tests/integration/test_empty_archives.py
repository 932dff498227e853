"""Archives without images each get exactly one ``skipped`` row, whatever their format."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pyarrow.parquet as pq
import pytest

from pipeline.config import JobSpec

pytestmark = pytest.mark.integration


def _tar(path, members: dict[str, bytes], mode: str) -> None:  # type: ignore[no-untyped-def]
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_archives_without_images_are_skipped_once(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    from pipeline.execution import run_job

    src = tmp_path / "in"
    src.mkdir()
    _tar(src / "empty.tar.gz", {}, "w:gz")
    _tar(src / "text.tgz", {"readme.txt": b"hi"}, "w:gz")
    _tar(src / "empty.tar", {}, "w")
    with zipfile.ZipFile(src / "empty.zip", "w"):
        pass
    summary = run_job(JobSpec.from_dict({"inputs": [str(src)], "output": str(tmp_path / "out")}))
    rows = pq.read_table(tmp_path / "out" / "manifest" / "manifest.parquet").to_pylist()
    archives = {r["input"].rsplit("/", 1)[-1]: r for r in rows if r["member"] is None}
    assert set(archives) == {"empty.tar.gz", "text.tgz", "empty.tar", "empty.zip"}
    assert all(r["status"] == "skipped" and r["error_type"] == "NoImages" for r in archives.values())
    assert [r["member"] for r in rows if r["member"]] == ["readme.txt"]
    assert (summary.ok, summary.failed, summary.skipped) == (0, 0, 5)
