"""Job specs: frozen, keyword-only dataclasses validated on construction, round-tripping to TOML.

A spec file has one table per section::

    inputs = ["s3://bucket/photos/*.tar"]
    output = "s3://bucket/cubes/run1"

    [weights]      # path = "" → the package's default weights
    [inference]    # mode, precision, channels_last, device
    [tiling]       # max_tile_pixels, tile_core, halo
    [output_options]  # max_error, dtype, chunk, compressor, level
    [decode]       # max_pixels, stream_pixels, max_member_bytes
    [ray]          # address, actors, gpus/cpus per actor, batch_size, in-flight bounds
    [storage]      # fsspec/S3 options by reference (secrets only as env-var names)
    [qa]           # optional QA thresholds (README "Outputs: QA, previews, report, exports")

Configs hold no live objects and no secrets: the ``storage`` table may name environment variables
(``key_env``, ``secret_env``) but never hold a secret itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import tomli_w

from pipeline.errors import ConfigError
from pipeline.storage import check_storage_section, check_url

__all__ = [
    "WeightsSpec",
    "InferenceSpec",
    "TilingSpec",
    "OutputSpec",
    "RaySpec",
    "QASpec",
    "DecodeSpec",
    "JobSpec",
    "load_spec",
    "parse_overrides",
]

T = TypeVar("T")

# Below 1e-5 float32 arithmetic leaves too little range (pipeline.cubes.Quantiser); above 0.1 is no spectrum.
MIN_MAX_ERROR, MAX_MAX_ERROR = 1e-5, 0.1


def _check(cond: bool, section: str, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{section}.{name} = {value!r}: {why}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightsSpec:
    """Which weights to use. ``path`` empty: the package's default weights."""

    path: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        _check(
            self.sha256 == "" or (len(self.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in self.sha256)),
            "weights",
            "sha256",
            self.sha256,
            "must be 64 hex digits or empty",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceSpec:
    """How the model runs.

    mode: reconstruction of single-tile images whose size is not a multiple of 4 — ``"pad"`` (reflect pad,
      one pass) or ``"authors"`` (the authors' overlapping passes).
    precision: ``fp32`` (default, reference), ``bf16``/``fp16`` (GPU only).
    device: ``auto`` (CUDA when the actor has a GPU), ``cpu`` or ``cuda``.
    ensemble: test-time ensemble, 1 (off), 2, 4 or 8 flips/transposes averaged (that many times the
      compute; README "Test-time ensemble").
    """

    mode: str = "pad"
    precision: str = "fp32"
    # NHWC convolutions: 0.85× the time of NCHW on this CPU at 1e-6 relative difference (README
    # "Fast defaults"); cuDNN prefers NHWC too.
    channels_last: bool = True
    device: str = "auto"
    ensemble: int = 1

    def __post_init__(self) -> None:
        _check(self.mode in ("pad", "authors"), "inference", "mode", self.mode, "must be 'pad' or 'authors'")
        _check(
            self.precision in ("fp32", "bf16", "fp16"),
            "inference",
            "precision",
            self.precision,
            "must be fp32, bf16 or fp16",
        )
        _check(self.device in ("auto", "cpu", "cuda"), "inference", "device", self.device, "must be auto, cpu or cuda")
        _check(self.ensemble in (1, 2, 4, 8), "inference", "ensemble", self.ensemble, "must be 1, 2, 4 or 8")


TILE_STATISTICS_HALO = 32
"""The halo of an unset ``tiling.halo`` with ``statistics = "tile"``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TilingSpec:
    """Tiling of large images (see README "Tiling" for the measured tiled-vs-whole difference).

    max_tile_pixels: images with H·W up to this run whole, as one tile.
    tile_core: side of each tile's core, the region it writes (multiple of 4 and of the output chunk).
    halo: context added on each side of the core (even); windows are shifted inwards at image borders.
      Unset, it follows the weights (:meth:`with_halo_for`): with ``"global"`` statistics their receptive
      radius rounded up to a multiple of 4 (32 for the default 2-block weights, 80 for the NTIRE 10-block
      ones), which makes the cube equal the whole-image run's; with ``"tile"`` statistics 32.
    statistics: the channel re-calibration statistics tiles run with — ``"global"`` (the whole image's,
      gathered from the tiles first: the cube equals the whole-image run's, given a halo at least the
      model's receptive radius) or ``"tile"`` (each tile's own: one pass, close but not equal);
      README "Exact tiling" measures both.
    """

    max_tile_pixels: int = 2048 * 2048
    tile_core: int = 512
    halo: int | None = None
    statistics: str = "global"

    def __post_init__(self) -> None:
        _check(self.max_tile_pixels >= 16, "tiling", "max_tile_pixels", self.max_tile_pixels, "must be >= 16")
        _check(
            self.tile_core >= 4 and self.tile_core % 4 == 0,
            "tiling",
            "tile_core",
            self.tile_core,
            "must be a positive multiple of 4",
        )
        _check(
            self.halo is None or (self.halo >= 0 and self.halo % 2 == 0),
            "tiling",
            "halo",
            self.halo,
            "must be an even number >= 0 (tile = core + 2·halo, a multiple of 4)",
        )
        _check(
            self.statistics in ("tile", "global"),
            "tiling",
            "statistics",
            self.statistics,
            "must be 'tile' (each tile's own) or 'global' (the whole image's)",
        )

    def halo_for(self, n_blocks: int) -> int:
        """The halo: as given, else what weights of ``n_blocks`` DRCR blocks need."""
        if self.halo is not None:
            return self.halo
        if self.statistics == "tile":  # no halo makes per-tile statistics exact; keep the window small
            return TILE_STATISTICS_HALO
        from drcr_model.net import receptive_radius  # here, not on top: reading a spec needs no torch

        return -(-receptive_radius(n_blocks) // 4) * 4

    def with_halo_for(self, n_blocks: int) -> TilingSpec:
        """This spec with ``halo`` set (:meth:`halo_for`)."""
        return dataclasses.replace(self, halo=self.halo_for(n_blocks))


LAYOUTS = ("chunked", "sharded")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """How cubes are stored. ``chunk`` is the spatial chunk side; all 31 bands share a chunk.

    max_error: > 0 stores the cube error-bounded (README "Error-bounded cubes"): every decoded value is
      within ``max_error`` (absolute, the cube's units) of the model's float32 output, guaranteed; it
      decodes as float32 and ``dtype``/``compressor``/``level`` do not apply. ``0``: ``dtype`` rounding
      (float16 by default) with ``compressor`` at ``level``.
    layout: ``"chunked"``: one stored object per chunk; ``"sharded"``: one object (a zarr v3
      ``sharding_indexed`` shard) per tile core, holding that core's chunks (README "Outputs").
    """

    # 5e-4 is float16's rounding at 1.0, at a quarter of float16's bytes and 5x its encode speed
    # (benchmarks/bench_output.py, README "Error-bounded cubes").
    max_error: float = 5e-4
    dtype: str = "float16"
    chunk: int = 256
    # blosc-zstd (byte shuffle) level 3: 23% fewer bytes than plain zstd-3 on float16 cubes and faster
    # to write (benchmarks/bench_output.py, README "Performance").
    compressor: str = "blosc-zstd"
    level: int = 3
    layout: str = "chunked"

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("float16", "float32"), "output_options", "dtype", self.dtype, "must be float16 or float32"
        )
        _check(
            self.chunk >= 4 and self.chunk % 4 == 0,
            "output_options",
            "chunk",
            self.chunk,
            "must be a positive multiple of 4",
        )
        _check(
            self.compressor in ("zstd", "blosc-zstd", "blosc-lz4", "gzip", "none"),
            "output_options",
            "compressor",
            self.compressor,
            "must be zstd, blosc-zstd, blosc-lz4, gzip or none",
        )
        # blosc and gzip stop at 9: a higher level would be used as 9 yet recorded as given.
        top = 22 if self.compressor in ("zstd", "none") else 9
        _check(
            0 <= self.level <= top, "output_options", "level", self.level, f"must be in 0..{top} for {self.compressor}"
        )
        _check(
            self.layout in LAYOUTS,
            "output_options",
            "layout",
            self.layout,
            "must be 'chunked' (an object per chunk) or 'sharded' (an object per tile core)",
        )
        _check(
            self.max_error == 0 or MIN_MAX_ERROR <= self.max_error <= MAX_MAX_ERROR,
            "output_options",
            "max_error",
            self.max_error,
            f"must be 0 (no error bound: dtype rounding) or in [{MIN_MAX_ERROR:g}, {MAX_MAX_ERROR:g}]",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RaySpec:
    """Ray resources.

    address: Ray cluster to join ("" → RAY_ADDRESS or a new local Ray).
    actors: number of inference actors (each loads the weights once); shorthand for a fixed-size pool
      (``min_actors = max_actors = actors``).
    min_actors, max_actors: an elastic pool (0: ``actors``). Ray Data starts ``min_actors``, adds actors
      up to ``max_actors`` while batches queue and the cluster has room (nodes or GPUs that join mid-job
      included) and removes idle ones.
    num_gpus_per_actor: GPUs per actor; fractional shares a GPU. ``-1`` (auto): 1 if the cluster has a
      GPU when the job starts, else 0 (CPU actors); auto never waits. A value > 0 on a cluster with no
      GPU yet waits up to ``gpu_wait_s`` for the autoscaler to add one, then fails.
    gpu_wait_s: seconds to wait for a first GPU when ``num_gpus_per_actor > 0``.
    num_cpus_per_actor: CPUs per actor (torch threads are sized to this).
    batch_size: tiles per forward pass (tiles of one image, in plan order, so results are deterministic).
    max_images_in_flight: images decoded/tiled/being inferred at once (backpressure bound on memory).
    max_batches_per_actor: batches queued per actor (2 keeps the next batch ready while one runs).
    overlap_writes: an actor writes a batch's cores to zarr while it computes the next batch (two calls
      in flight per actor, compute serialised by a lock; each call still returns only after its writes,
      so the completion marker still follows every write). False: compute and write strictly in turn.
    """

    address: str = ""
    actors: int = 1
    min_actors: int = 0
    max_actors: int = 0
    num_gpus_per_actor: float = -1
    gpu_wait_s: float = 600.0
    num_cpus_per_actor: float = 1
    batch_size: int = 4
    max_images_in_flight: int = 4
    max_batches_per_actor: int = 2
    decode_num_cpus: float = 1
    overlap_writes: bool = True

    def __post_init__(self) -> None:
        _check(self.actors >= 1, "ray", "actors", self.actors, "must be >= 1")
        _check(self.min_actors >= 0, "ray", "min_actors", self.min_actors, "must be >= 0 (0: ray.actors)")
        _check(
            self.max_actors == 0 or self.max_actors >= self.pool_size[0],
            "ray",
            "max_actors",
            self.max_actors,
            f"must be 0 (ray.actors) or >= the pool's minimum ({self.pool_size[0]})",
        )
        _check(self.gpu_wait_s >= 0, "ray", "gpu_wait_s", self.gpu_wait_s, "must be >= 0")
        _check(
            self.num_gpus_per_actor == -1 or self.num_gpus_per_actor >= 0,
            "ray",
            "num_gpus_per_actor",
            self.num_gpus_per_actor,
            "must be >= 0 or -1 (auto)",
        )
        _check(self.num_cpus_per_actor > 0, "ray", "num_cpus_per_actor", self.num_cpus_per_actor, "must be > 0")
        _check(self.batch_size >= 1, "ray", "batch_size", self.batch_size, "must be >= 1")
        _check(self.max_images_in_flight >= 1, "ray", "max_images_in_flight", self.max_images_in_flight, "must be >= 1")
        _check(
            self.max_batches_per_actor >= 1, "ray", "max_batches_per_actor", self.max_batches_per_actor, "must be >= 1"
        )
        _check(self.decode_num_cpus > 0, "ray", "decode_num_cpus", self.decode_num_cpus, "must be > 0")

    @property
    def pool_size(self) -> tuple[int, int]:
        """``(min, max)`` inference actors: ``min_actors``/``max_actors`` where set, else ``actors``."""
        low = self.min_actors or self.actors
        return low, max(self.max_actors or max(self.actors, low), low)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QASpec:
    """Thresholds on each cube's QA (:mod:`pipeline.qa`); a negative value switches a threshold off.

    max_backprojection_mrae / max_backprojection_rmse: the cube projected through the weights' camera
      response vs the model's input, after the per-image exposure fit.
    max_negative_fraction / max_above_one_fraction: fractions of the cube's values < 0 and > 1.
    on_exceed: ``"flag"`` (the image stays ``ok``, ``qa_flags`` names the thresholds) or ``"fail"`` (the
      image is ``failed`` and its cube is not marked complete). Non-finite values always fail.
    """

    max_backprojection_mrae: float = -1.0
    max_backprojection_rmse: float = -1.0
    max_negative_fraction: float = -1.0
    max_above_one_fraction: float = -1.0
    on_exceed: str = "flag"

    def __post_init__(self) -> None:
        _check(self.on_exceed in ("flag", "fail"), "qa", "on_exceed", self.on_exceed, "must be 'flag' or 'fail'")

    def thresholds(self) -> dict[str, float]:
        """The active thresholds, by QA field (``backprojection_mrae``, …)."""
        return {
            f.name.removeprefix("max_"): float(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name.startswith("max_") and getattr(self, f.name) >= 0
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    """How images are decoded (README "Decoding policy": what each size costs).

    max_pixels: decompression-bomb guard, W·H; larger images fail from their header. The default is Pillow's
      own guard (~89.5 MP); raise it for genuine large photos and scans.
    stream_pixels: images with more pixels than this take the streaming path (:mod:`pipeline.bigdecode`:
      libvips, pixels read by region, memory independent of the image size); smaller ones are decoded whole
      by Pillow, which is faster for them. The default is the measured crossover (README).
    max_member_bytes: the largest image file or archive member read, in bytes (declared size: larger ones
      are refused from their header or listing, nothing read); the hostile-input bound of
      ``pipeline.sources.MAX_MEMBER_BYTES`` (256 MiB). Raise it for genuine big encoded files (a gigapixel
      TIFF or PNG): those the streaming path reads in place or copies to local disk never hold their bytes in
      memory, while ``.zip`` / ``.tar.gz`` members and images Pillow decodes are held whole.
    """

    max_pixels: int = 89_478_485
    stream_pixels: int = 16 * 1024 * 1024
    max_member_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        _check(self.max_pixels >= 1, "decode", "max_pixels", self.max_pixels, "must be >= 1")
        _check(self.stream_pixels >= 0, "decode", "stream_pixels", self.stream_pixels, "must be >= 0")
        _check(self.max_member_bytes >= 1, "decode", "max_member_bytes", self.max_member_bytes, "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A whole job. ``inputs`` are fsspec URLs or globs (files, prefixes, archives); ``output`` a prefix."""

    name: str = "drcr-job"
    inputs: tuple[str, ...] = ()
    output: str = ""
    weights: WeightsSpec = dataclasses.field(default_factory=WeightsSpec)
    inference: InferenceSpec = dataclasses.field(default_factory=InferenceSpec)
    tiling: TilingSpec = dataclasses.field(default_factory=TilingSpec)
    output_options: OutputSpec = dataclasses.field(default_factory=OutputSpec)
    ray: RaySpec = dataclasses.field(default_factory=RaySpec)
    qa: QASpec = dataclasses.field(default_factory=QASpec)
    decode: DecodeSpec = dataclasses.field(default_factory=DecodeSpec)
    storage: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        _check(len(self.inputs) > 0, "job", "inputs", list(self.inputs), "at least one input URL is needed")
        _check(bool(self.output), "job", "output", self.output, "an output URL/prefix is needed")
        _check(
            self.tiling.tile_core % 4 == 0 and self.tiling.tile_core % self.output_options.chunk == 0,
            "tiling",
            "tile_core",
            self.tiling.tile_core,
            f"must be a multiple of output_options.chunk ({self.output_options.chunk}) so no two tiles share a chunk",
        )
        for i, url in enumerate(self.inputs):
            check_url(url, f"inputs[{i}]")
        check_url(self.output, "output")
        check_url(self.weights.path, "weights.path")
        check_storage_section(self.storage)
        object.__setattr__(self, "storage", dict(self.storage))

    # --- round trip -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inputs"] = list(self.inputs)
        return d

    def to_toml(self) -> str:
        d = self.to_dict()
        d["tiling"] = {k: v for k, v in d["tiling"].items() if v is not None}  # TOML has no null: unset stays unset
        return tomli_w.dumps(d)

    def with_halo_for(self, weights_config: Mapping[str, int]) -> JobSpec:
        """This spec with ``tiling.halo`` resolved for the weights (:meth:`TilingSpec.with_halo_for`)."""
        return dataclasses.replace(self, tiling=self.tiling.with_halo_for(int(weights_config["n_blocks"])))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        sections = {
            "weights": WeightsSpec,
            "inference": InferenceSpec,
            "tiling": TilingSpec,
            "output_options": OutputSpec,
            "ray": RaySpec,
            "qa": QASpec,
            "decode": DecodeSpec,
        }
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - top
        if unknown:
            raise ConfigError(f"unknown job spec keys: {sorted(unknown)}; expected some of {sorted(top)}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sections:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"[{key}] must be a table, got {type(value).__name__}")
                kwargs[key] = _build(sections[key], key, value)
            elif key == "inputs":
                items = [value] if isinstance(value, str) else value
                if not isinstance(items, (list, tuple)) or not all(isinstance(u, str) for u in items):
                    raise ConfigError(f"inputs = {value!r}: expected a list of URL strings")
                kwargs[key] = tuple(items)
            elif key in ("name", "output") and not isinstance(value, str):
                raise ConfigError(f"{key} = {value!r}: expected str, got {type(value).__name__}")
            elif key == "storage" and not isinstance(value, Mapping):
                raise ConfigError(f"[storage] must be a table, got {type(value).__name__}")
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def with_overrides(self, overrides: Mapping[str, Any]) -> JobSpec:
        """Apply ``{"tiling.halo": 16, "inputs": [...]}``-style overrides; validated again."""
        d = self.to_dict()
        for dotted, value in overrides.items():
            parts = dotted.split(".")
            target = d
            for p in parts[:-1]:
                if not isinstance(target.get(p), dict):
                    raise ConfigError(f"override {dotted!r}: no section {p!r}")
                target = target[p]
            target[parts[-1]] = value
        return JobSpec.from_dict(d)

    def fingerprint(self, weights_sha256: str) -> str:
        """sha256 of everything that changes the cubes' bytes (for resume: same fingerprint → same output).

        The package version is in it: a release that fixes decoding or tiling redoes the cubes made before."""
        from pipeline import __version__

        relevant = {
            "package_version": __version__,
            "weights_sha256": weights_sha256,
            "inference": dataclasses.asdict(self.inference) | {"device": None, **_GONE_INFERENCE_FIELDS},
            "tiling": dataclasses.asdict(self.tiling),
            "output_options": _output_fingerprint(self.output_options),
            "batch_size": self.ray.batch_size,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


_GONE_INFERENCE_FIELDS = {"stand_in_latency_s": 0.0}
"""Fields the inference section no longer has, at the value every real job had: they stay in the fingerprint
so outputs made before they went keep their fingerprint (and are not redone)."""


def _output_fingerprint(spec: OutputSpec) -> dict[str, Any]:
    """The output options in the fingerprint; the default layout is left out, so outputs made before the
    option existed keep their fingerprint (and are not redone)."""
    d = dataclasses.asdict(spec)
    if d["layout"] == "chunked":
        del d["layout"]
    return d


def _build(cls: type[T], section: str, values: Mapping[str, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"[{section}] unknown keys {sorted(unknown)}; expected some of {sorted(fields)}")
    kwargs = {k: _typed(section, k, fields[k].type, v) for k, v in values.items()}
    return cls(**kwargs)


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _typed(section: str, name: str, want: Any, value: Any) -> Any:
    """``value`` if it has the field's type, else a ConfigError: no silent coercion (``1.9`` is not an int,
    ``"yes"`` not a bool, ``true`` not a number). Ints are accepted for floats (``halo = 2`` in TOML)."""
    key = want if isinstance(want, str) else getattr(want, "__name__", str(want))
    if key.endswith(" | None"):  # optional: None only comes from a spec's own dict (TOML has no null)
        if value is None:
            return None
        key = key.removesuffix(" | None")
    allowed = _TYPES.get(key)
    if allowed is None:
        return value
    ok = isinstance(value, allowed) and (key == "bool" or not isinstance(value, bool))
    if ok and key == "float" and not math.isfinite(value):
        raise ConfigError(f"{section}.{name} = {value!r}: must be a finite number")
    if not ok:
        raise ConfigError(f"{section}.{name} = {value!r}: expected {key}, got {type(value).__name__} (no conversion)")
    return float(value) if key == "float" else value


def load_spec(path_or_text: str, *, is_text: bool = False) -> JobSpec:
    """Load a TOML job spec from a path (local) or from text."""
    try:
        if is_text:
            data = tomllib.loads(path_or_text)
        else:
            with open(path_or_text, "rb") as f:
                data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"job spec {path_or_text!r} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job spec {path_or_text if not is_text else '<text>'}: invalid TOML: {exc}") from exc
    return JobSpec.from_dict(data)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["tiling.halo=16", "ray.actors=2"]`` → dict; values parsed as TOML scalars when they parse."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out
