"""Write ``pipeline/data/cie1931_2deg_d65_400_700_10nm.csv`` once from colour-science (a test dependency).

The pipeline reads the CSV at run time and never needs colour-science. Source: colour-science
``MSDS_CMFS["CIE 1931 2 Degree Standard Observer"]`` and ``SDS_ILLUMINANTS["D65"]`` (CIE 015:2018
tables), sampled at 400–700 nm in 10 nm steps (the cube's bands; both tables are tabulated there).

    .venv/bin/python scripts/make_colour_tables.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "pipeline" / "data" / "cie1931_2deg_d65_400_700_10nm.csv"


def main() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # colour warns on import without SciPy; only its data is used
        import colour
    wl = np.arange(400, 701, 10)
    cmfs = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"]
    d65 = colour.SDS_ILLUMINANTS["D65"]
    lines = [
        f"# CIE 1931 2 degree standard observer and CIE illuminant D65, 400-700 nm, 10 nm; "
        f"from colour-science {colour.__version__} (MSDS_CMFS, SDS_ILLUMINANTS; CIE 015:2018) "
        "by scripts/make_colour_tables.py",
        "wavelength_nm,x_bar,y_bar,z_bar,d65",
    ]
    for w in wl:
        x, y, z = (float(v) for v in cmfs[w])
        lines.append(f"{int(w)},{x:.6g},{y:.6g},{z:.6g},{float(d65[w]):.6g}")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(OUT)


if __name__ == "__main__":
    main()
