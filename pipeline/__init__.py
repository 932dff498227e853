"""drcr-pipeline: RGB archives in object storage → Ray → DRCR actors → zarr v3 cubes with provenance."""

__version__ = "0.1.0"
