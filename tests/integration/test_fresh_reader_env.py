"""A user with only zarr, numcodecs and xarray (not this package) opens an error-bounded cube, and the same
cube in the sharded layout (``output_options.layout = "sharded"``: shards we assemble ourselves) for both
storage codecs.

The cubes are written here with the default ``output_options`` (``max_error`` = 5e-4) and the layouts; a new virtual
environment in a temporary folder gets ``zarr``, ``numcodecs`` and ``xarray`` from the package index (the
same versions as ours, so pip's cache serves them) and nothing else; a script run there, outside the
repository, checks that ``pipeline``, ``drcr_model`` and ``numba`` (the writers' encoder) cannot be imported, opens the cube with
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
from pipeline.config import OutputSpec, TilingSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

READER = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np
    import xarray as xr
    assert importlib.util.find_spec("pipeline") is None and importlib.util.find_spec("drcr_model") is None
    assert importlib.util.find_spec("numba") is None  # the writers' encoder; readers need none of it
    ref = np.load(sys.argv[2])
    for group in sys.argv[3:]:
        ds = xr.open_zarr(sys.argv[1], group=group, consolidated=False)
        cube = ds.cube.values
        assert ds.cube.dims == ("wavelength", "y", "x"), ds.cube.dims
        print(group, cube.dtype, float(np.abs(cube.astype(np.float32) - ref).max()), ds.cube.attrs.get("max_abs_error"), len(ds.wavelength))
    """
)


GROUPS = {
    "photos/img-1": OutputSpec(chunk=16),
    "photos/img-sharded": OutputSpec(chunk=16, layout="sharded"),
    "photos/img-sharded-f16": OutputSpec(chunk=16, layout="sharded", max_error=0),
}


def test_xarray_opens_the_cube_with_only_zarr_numcodecs_xarray(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline import residuals

    spec = OutputSpec()
    assert spec.max_error > 0 and residuals.fused_available()  # written by the numba encoder
    store = cubes.open_cubes(str(tmp_path / "out"))
    ref = np.random.default_rng(0).normal(0.4, 0.2, (31, 40, 50)).astype(np.float32)
    tiling = TilingSpec(max_tile_pixels=1000, tile_core=32)  # tiled: shards of 32², edge shards part-empty
    for group, group_spec in GROUPS.items():
        cubes.create_cube(
            store,
            group,
            height=40,
            width=50,
            bands_nm=range(400, 701, 10),
            spec=group_spec,
            provenance={},
            tiling=tiling,
        )
        regions = [(0, 0, ref[:, :32, :32]), (0, 32, ref[:, :32, 32:]), (32, 0, ref[:, 32:, :32]), (32, 32, ref[:, 32:, 32:])]
        cubes.write_regions(store, group, regions)
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
            *GROUPS,
        ],
        cwd=tmp_path,  # outside the repository: nothing of ours on sys.path
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    assert set(lines) == set(GROUPS), out.stdout
    for group in ("photos/img-1", "photos/img-sharded"):
        dtype, err, bound, bands = lines[group]
        assert dtype == "float32" and float(err) <= float(bound) == spec.max_error and int(bands) == 31
    dtype, err, bound, bands = lines["photos/img-sharded-f16"]
    assert dtype == "float16" and bound == "None" and float(err) <= 2e-3 and int(bands) == 31  # float16 at <= 1.4
