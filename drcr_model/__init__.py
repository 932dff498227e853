"""DRCR Net for RGB → 31-band spectral reconstruction: model, checkpoints, inference, metrics, training."""

from drcr_model.net import DRCRNet

__all__ = ["DRCRNet"]
