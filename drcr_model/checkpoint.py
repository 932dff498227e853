"""Loading DRCR checkpoints as users actually have them.

Accepted (spec §7): a bare state_dict, or a training dict holding it under ``state_dict`` (the
authors' ``main.py`` writes ``{epoch, iter, state_dict, optimizer}``); ``module.`` prefixes from
DataParallel; key names that differ but whose order and shapes match (the authors' own ``test.py``
pairs tensors by position); and the older 202-tensor variant without the unused
``denosing.conv4_33``/``conv4_11`` tensors. Files always load with ``torch.load(weights_only=True)``;
a given sha256 is checked before anything is unpickled. Any mismatch raises :class:`CheckpointError`
naming the first differing keys/shapes — never a silent partial load.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import fsspec
import torch

from drcr_model.net import DRCRNet

__all__ = [
    "CheckpointError",
    "read_checkpoint",
    "extract_state_dict",
    "infer_config",
    "load_state_dict",
    "load_model",
    "sha256_of",
]

log = logging.getLogger(__name__)

# The four tensors the reference registers but never uses (spec §3.2); the older variant lacks them.
UNUSED_KEYS = (
    "denosing.conv4_33.weight",
    "denosing.conv4_33.bias",
    "denosing.conv4_11.weight",
    "denosing.conv4_11.bias",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit DRCR Net; the message says which file and which keys."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(
    source: str, *, sha256: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str]:
    """Read a checkpoint file (path or fsspec URL) → ``(object, sha256 of the file)``.

    The hash is checked before unpickling; loading is ``weights_only=True`` always.
    """
    try:
        with fsspec.open(source, "rb", **dict(storage_options or {})) as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {source!r}: {type(exc).__name__}: {exc}") from exc
    digest = sha256_of(data)
    if sha256 is not None and digest != sha256.lower():
        raise CheckpointError(
            f"checkpoint {source!r} has sha256 {digest}, expected {sha256.lower()}; refusing to load it"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or non-weights-only files
        raise CheckpointError(
            f"checkpoint {source!r} is not a loadable weights-only torch file: {type(exc).__name__}: {exc}"
        ) from exc
    return obj, digest


def extract_state_dict(obj: Any, *, source: str = "<checkpoint>") -> OrderedDict[str, torch.Tensor]:
    """The model tensors of a loaded checkpoint, ``module.`` prefixes removed, order kept."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: expected a state_dict or a dict with 'state_dict', got {type(obj).__name__}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = str(key)
        while name.startswith("module."):
            name = name[len("module.") :]
        out[name] = value
    return out


def infer_config(state_dict: Mapping[str, torch.Tensor], *, source: str = "<checkpoint>") -> dict[str, int]:
    """DRCRNet constructor arguments from tensor shapes (by position, so renamed keys work too).

    The first tensor is the input conv ``[C, in, 3, 3]``, the last the output conv ``[out, C, 3, 3]``;
    each block holds 18 tensors besides 26 (or 22, older variant) others.
    """
    tensors = list(state_dict.values())
    first, last = tensors[0], tensors[-1]
    if first.ndim != 4 or last.ndim != 4 or first.shape[2:] != (3, 3) or last.shape[2:] != (3, 3):
        raise CheckpointError(
            f"{source}: first/last tensors {tuple(first.shape)} / {tuple(last.shape)} are not DRCR's 3x3 input/output convs"
        )
    n = len(tensors)
    for fixed in (26, 22):
        if n > fixed and (n - fixed) % 18 == 0:
            return {
                "in_channels": int(first.shape[1]),
                "out_channels": int(last.shape[0]),
                "channels": int(first.shape[0]),
                "n_blocks": (n - fixed) // 18,
            }
    raise CheckpointError(f"{source}: {n} tensors do not fit DRCR Net (26 + 18·N or 22 + 18·N expected)")


def _first_differences(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], limit: int = 3) -> str:
    lines = []
    for (ek, ev), (gk, gv) in zip(expected.items(), got.items()):
        if tuple(ev.shape) != tuple(gv.shape):
            lines.append(f"{ek} {list(ev.shape)} vs checkpoint {gk} {list(gv.shape)}")
            if len(lines) >= limit:
                break
    if len(expected) != len(got):
        lines.append(f"model has {len(expected)} tensors, checkpoint {len(got)}")
    return "; ".join(lines) or "no shape difference found"


def load_state_dict(model: DRCRNet, state_dict: Mapping[str, torch.Tensor], *, source: str = "<checkpoint>") -> str:
    """Load ``state_dict`` into ``model`` exactly, or raise. Returns how it matched: 'names', 'names-202' or 'positions'."""
    expected = model.state_dict()
    sd = OrderedDict(state_dict)
    if list(sd) == list(expected) or set(sd) == set(expected):
        bad = [k for k in expected if tuple(expected[k].shape) != tuple(sd[k].shape)]
        if bad:
            k = bad[0]
            raise CheckpointError(
                f"{source}: shape mismatch at {k}: model {list(expected[k].shape)}, checkpoint {list(sd[k].shape)}"
            )
        model.load_state_dict(sd, strict=True)
        return "names"
    missing = [k for k in expected if k not in sd]
    if set(missing) == set(UNUSED_KEYS) and set(sd) <= set(expected):
        # Older 202-tensor variant: the missing tensors are never used in forward (spec §9.15).
        bad = [k for k in sd if tuple(expected[k].shape) != tuple(sd[k].shape)]
        if bad:
            k = bad[0]
            raise CheckpointError(
                f"{source}: shape mismatch at {k}: model {list(expected[k].shape)}, checkpoint {list(sd[k].shape)}"
            )
        merged = OrderedDict((k, sd.get(k, expected[k])) for k in expected)
        model.load_state_dict(merged, strict=True)
        return "names-202"
    target: list[str] = list(expected)
    if len(sd) == len(expected) - len(UNUSED_KEYS):
        target = [k for k in expected if k not in UNUSED_KEYS]
    if len(sd) != len(target) or any(tuple(expected[t].shape) != tuple(v.shape) for t, v in zip(target, sd.values())):
        diff = _first_differences(OrderedDict((k, expected[k]) for k in target), sd)
        unknown = [k for k in sd if k not in expected][:3]
        raise CheckpointError(
            f"{source}: does not match DRCRNet{tuple(model.config.values())} by name or by position; "
            f"first differences: {diff}; first unknown keys: {unknown}; first missing keys: {missing[:3]}"
        )
    # The authors' loader pairs tensors by position (spec §7); shapes were checked above.
    mapped = OrderedDict((t, v) for t, v in zip(target, sd.values()))
    merged = OrderedDict((k, mapped.get(k, expected[k])) for k in expected)
    model.load_state_dict(merged, strict=True)
    log.info("%s: key names differ from DRCRNet's; loaded by position as the authors' test.py does", source)
    return "positions"


def load_model(
    source: str,
    *,
    sha256: str | None = None,
    device: str | torch.device | None = None,
    config: Mapping[str, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DRCRNet:
    """Path or fsspec URL of a checkpoint → :class:`DRCRNet` in eval mode on ``device``.

    The configuration is inferred from the tensor shapes unless ``config`` is given.
    ``device=None`` picks CUDA when present, else CPU.
    """
    obj, digest = read_checkpoint(source, sha256=sha256, storage_options=storage_options)
    sd = extract_state_dict(obj, source=source)
    cfg = dict(config) if config is not None else infer_config(sd, source=source)
    model = DRCRNet(**cfg)
    how = load_state_dict(model, sd, source=source)
    model.weights_sha256 = digest  # type: ignore[assignment]
    model.load_method = how  # type: ignore[assignment]
    from drcr_model.inference import select_device

    return model.to(select_device(device)).eval()
