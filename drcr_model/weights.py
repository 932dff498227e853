"""Weights are data, not code: a record of where a file is and everything that goes with it.

In the spirit of torchvision's ``Weights``: location (path or fsspec URL), sha256, the model
configuration, the input preprocessing the weights were trained with, the bands they produce, and
metrics/meta. :meth:`Weights.load` builds the model from the record, so config and file cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Weights",
    "BANDS_NM",
    "check_config_for_job",
    "NTIRE2022_CONFIG",
    "authors_ntire2022",
    "default_weights",
    "untrained_demo_weights",
]

BANDS_NM: tuple[int, ...] = tuple(range(400, 701, 10))
"""Centre wavelengths of the 31 output bands in nm (ARAD_1K: 400–700 nm, 10 nm steps)."""

NTIRE2022_CONFIG: Mapping[str, int] = {"in_channels": 3, "out_channels": 31, "channels": 100, "n_blocks": 10}

PREPROCESSING = ("divide_by_image_max",)

CONFIG_KEYS = ("in_channels", "out_channels", "channels", "n_blocks")
"""The DRCRNet constructor arguments a weights record may set."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Weights:
    """A weights file and what goes with it.

    Args:
        name: short identifier recorded in provenance.
        url: path or fsspec URL of the checkpoint (``None``: the user supplies it).
        sha256: expected sha256 of the file; checked on load when set.
        config: DRCRNet constructor arguments.
        preprocessing: input scaling the weights expect; ``"divide_by_image_max"`` (the authors').
        bands_nm: centre wavelength of each output band, nm.
        camera: the RGB camera whose images the weights were trained on (its spectral response is what
            QA projects cubes through, :func:`drcr_model.camera.camera_response`); ``"ntire2022"``.
        metrics: evaluation figures, e.g. ``{"synthetic_heldout": {"mrae": ...}}``.
        meta: anything else (training recipe, data seed, ``untrained`` flag, licence).
    """

    name: str
    url: str | None
    sha256: str | None = None
    config: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(NTIRE2022_CONFIG))
    preprocessing: str = "divide_by_image_max"
    bands_nm: tuple[int, ...] = BANDS_NM
    camera: str = "ntire2022"
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Weights.name must be a non-empty string, got {self.name!r}")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in self.sha256)
        ):
            raise ValueError(f"Weights.sha256 must be 64 hex digits or None, got {self.sha256!r}")
        unknown = set(self.config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"Weights.config has unknown keys {sorted(unknown)}; allowed: {list(CONFIG_KEYS)}")
        for key, value in self.config.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Weights.config[{key!r}] must be a positive int, got {value!r}")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"Weights.preprocessing must be one of {PREPROCESSING}, got {self.preprocessing!r}")
        from drcr_model.camera import CAMERAS

        if self.camera not in CAMERAS:
            raise ValueError(f"Weights.camera must be one of {CAMERAS}, got {self.camera!r}")
        if len(self.bands_nm) != int(self.config.get("out_channels", 31)):
            raise ValueError(
                f"Weights.bands_nm has {len(self.bands_nm)} bands but config.out_channels is {self.config.get('out_channels')}"
            )

    def check_job(self, *, in_channels: int = 3, bands_nm: tuple[int, ...] = BANDS_NM) -> None:
        """:func:`check_config_for_job` on these weights, and their band centres against ``bands_nm``."""
        check_config_for_job(self.config, self.url or self.name, in_channels=in_channels, bands=len(bands_nm))
        if tuple(self.bands_nm) != tuple(bands_nm):
            from drcr_model.checkpoint import CheckpointError

            raise CheckpointError(
                f"weights {self.url or self.name}: band centres {list(self.bands_nm)} nm differ from the job's "
                f"{bands_nm[0]}-{bands_nm[-1]} nm"
            )

    def load(
        self, *, device: str | torch.device | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> torch.nn.Module:
        """Build the DRCRNet of ``config`` and load the file into it (hash checked); eval mode."""
        from drcr_model.checkpoint import load_model

        if self.url is None:
            raise ValueError(f"weights {self.name!r} have no location; pass the checkpoint path or URL")
        return load_model(
            self.url, sha256=self.sha256, device=device, config=self.config, storage_options=storage_options
        )

    def to_record(self) -> dict[str, Any]:
        """JSON-ready dict (provenance, weights sidecar files)."""
        d = dataclasses.asdict(self)
        d["config"], d["bands_nm"] = dict(self.config), list(self.bands_nm)
        return d

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **overrides: Any) -> Weights:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - fields
        if unknown:
            raise ValueError(f"unknown weights record fields: {sorted(unknown)}")
        d = dict(record) | overrides
        if "bands_nm" in d:
            d["bands_nm"] = tuple(d["bands_nm"])
        return cls(**d)


def check_config_for_job(config: Mapping[str, int], where: str, *, in_channels: int = 3, bands: int = 31) -> None:
    """Refuse a model configuration that does not turn ``in_channels``-channel images into ``bands`` bands.

    Called when a job resolves its weights, so a 4-channel checkpoint fails the job at once with one line
    instead of every image with a traceback from the first convolution.

    Raises:
        CheckpointError: naming the weights, what they take or give, and what the job needs.
    """
    from drcr_model.checkpoint import CheckpointError

    got_in, got_out = int(config.get("in_channels", 3)), int(config.get("out_channels", 31))
    if got_in != in_channels:
        raise CheckpointError(
            f"weights {where}: the model takes {got_in} input channels, but the job gives {in_channels} (RGB); "
            f"use RGB-to-spectral DRCR weights"
        )
    if got_out != bands:
        raise CheckpointError(f"weights {where}: the model gives {got_out} bands, but the job needs {bands}")


def authors_ntire2022(url: str, *, sha256: str | None = None) -> Weights:
    """The authors' released NTIRE 2022 checkpoint (``model.pth``), at a location the user gives.

    The README links (spec §7) give no hash; pass ``sha256`` once you have verified your copy.
    """
    return Weights(
        name="drcr-ntire2022-authors",
        url=url,
        sha256=sha256,
        config=dict(NTIRE2022_CONFIG),
        meta={
            "source": "github.com/jojolee6513/DRCR-net (README download links)",
            "trained_on": "ARAD_1K (NTIRE 2022)",
        },
    )


def _package_weights_dir() -> Path:
    return Path(str(resources.files("drcr_model") / "weights"))


def default_weights() -> Weights:
    """The weights shipped in the package (trained on synthetic scenes), or the seeded untrained demo
    weights when no trained file ships (labelled ``untrained`` in provenance)."""
    sidecar = _package_weights_dir() / "default.json"
    if sidecar.exists():
        record = json.loads(sidecar.read_text())
        record["url"] = str(_package_weights_dir() / record.get("file", "default.pt"))
        record.pop("file", None)
        return Weights.from_record(record)
    return untrained_demo_weights()


UNTRAINED_SEED = 20220620
UNTRAINED_CONFIG: Mapping[str, int] = {"in_channels": 3, "out_channels": 31, "channels": 16, "n_blocks": 1}


def untrained_demo_weights(cache_dir: str | Path | None = None) -> Weights:
    """Seeded, untrained weights of a small configuration, written on first use.

    For demos and tests only: the cubes they produce are NOT meaningful spectra. Provenance says so.
    """
    from drcr_model.checkpoint import sha256_of
    from drcr_model.net import DRCRNet

    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "drcr-pipeline"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"untrained-{UNTRAINED_SEED}-c{UNTRAINED_CONFIG['channels']}-b{UNTRAINED_CONFIG['n_blocks']}.pt"
    if not path.exists():
        # CPU RNG only: the model is initialised on the CPU, and fork_rng() with the default devices warns
        # on machines with more than one GPU (an error under the test suite's warnings-as-errors).
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(UNTRAINED_SEED)
            model = DRCRNet(**UNTRAINED_CONFIG)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return Weights(
        name="drcr-untrained-demo",
        url=str(path),
        sha256=sha256_of(path.read_bytes()),
        config=dict(UNTRAINED_CONFIG),
        meta={
            "untrained": True,
            "seed": UNTRAINED_SEED,
            "note": "seeded random weights; outputs are not meaningful spectra",
        },
    )
