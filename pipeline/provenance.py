"""What goes into each cube's provenance: software versions, code version, host and device."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["software_versions", "git_commit", "now_utc", "host_info"]


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


@functools.cache
def git_commit() -> str | None:
    """The package checkout's git commit (``DRCR_PIPELINE_GIT_COMMIT`` wins, e.g. set in the image)."""
    env = os.environ.get("DRCR_PIPELINE_GIT_COMMIT")
    if env:
        return env
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or len(commit) != 40:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


@functools.cache
def software_versions() -> dict[str, Any]:
    import numpy
    import torch
    import zarr

    from pipeline import __version__

    versions: dict[str, Any] = {
        "drcr_pipeline": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a core dependency
        versions["ray"] = None
    return versions


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "platform": platform.platform()}
