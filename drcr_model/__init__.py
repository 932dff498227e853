"""DRCR Net for RGB → 31-band spectral reconstruction: model, checkpoints, inference, metrics, training."""

from drcr_model.camera import ntire2022_camera_response, simulate_rgb
from drcr_model.checkpoint import CheckpointError, load_model
from drcr_model.inference import preprocess, reconstruct, select_device
from drcr_model.net import DRCRNet
from drcr_model.weights import BANDS_NM, Weights, authors_ntire2022, default_weights

__all__ = [
    "ntire2022_camera_response",
    "simulate_rgb",
    "BANDS_NM",
    "CheckpointError",
    "DRCRNet",
    "Weights",
    "authors_ntire2022",
    "default_weights",
    "load_model",
    "preprocess",
    "reconstruct",
    "select_device",
]
