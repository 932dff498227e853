"""A user with only zarr, numcodecs and xarray (not this package) opens an error-bounded cube.

The cube is written here with the default ``output_options`` (``max_error`` = 5e-4); a new virtual
environment in a temporary folder gets ``zarr``, ``numcodecs`` and ``xarray`` from the package index (the
same versions as ours, so pip's cache serves them) and nothing else; a script run there, outside the
repository, checks that ``pipeline`` and ``drcr_model`` cannot be imported, opens the cube with
``xarray.open_zarr`` and compares it with the float32 values written.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import version

import numpy as np
import pytest

from pipeline import cubes
from pipeline.config import OutputSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

READER = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np
    import xarray as xr
    assert importlib.util.find_spec("pipeline") is None and importlib.util.find_spec("drcr_model") is None
    ds = xr.open_zarr(sys.argv[1], group="photos/img-1", consolidated=False)
    ref = np.load(sys.argv[2])
    cube = ds.cube.values
    assert cube.dtype == np.float32 and ds.cube.dims == ("wavelength", "y", "x"), (cube.dtype, ds.cube.dims)
    print(float(np.abs(cube - ref).max()), ds.cube.attrs["max_abs_error"], len(ds.wavelength))
    """
)


def test_xarray_opens_the_cube_with_only_zarr_numcodecs_xarray(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = OutputSpec()
    assert spec.max_error > 0
    store = cubes.open_cubes(str(tmp_path / "out"))
    ref = np.random.default_rng(0).normal(0.4, 0.2, (31, 40, 50)).astype(np.float32)
    cubes.create_cube(
        store,
        "photos/img-1",
        height=40,
        width=50,
        bands_nm=range(400, 701, 10),
        spec=OutputSpec(chunk=16),
        provenance={},
    )
    cubes.write_regions(
        store, "photos/img-1", [(0, 0, ref[:, :32, :32]), (0, 32, ref[:, :32, 32:]), (32, 0, ref[:, 32:, :])]
    )
    np.save(tmp_path / "ref.npy", ref)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [f"{name}=={version(name)}" for name in ("zarr", "numcodecs", "xarray", "numpy")]
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *pins],
        check=True,
        timeout=600,
    )
    (tmp_path / "reader.py").write_text(READER)
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-W",
            "ignore",
            "reader.py",
            str(tmp_path / "out" / "cubes.zarr"),
            str(tmp_path / "ref.npy"),
        ],
        cwd=tmp_path,  # outside the repository: nothing of ours on sys.path
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    err, bound, bands = out.stdout.split()
    assert float(err) <= float(bound) == spec.max_error and int(bands) == 31
