"""npconvnext: ConvNeXt image classification in NumPy, matching timm, with no deep-learning framework."""

from .config import VARIANTS, ConvNeXtConfig, get_config
from .convention import Convention
from .engine import set_num_threads
from .errors import CheckpointError, ImageError, InputError, NpConvNeXtError, TrainingError
from .factory import create_model, list_models
from .formats import load_state_dict
from .hub import list_pretrained
from .labels import imagenet_classes, imagenet_labels
from .model import ConvNeXt
from .preprocessing import DataConfig, data_config, preprocess
from . import train  # noqa: F401  (npconvnext.train.loss_and_grads, .AdamW: fine-tuning in NumPy)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Convention",
    "ConvNeXt",
    "ConvNeXtConfig",
    "DataConfig",
    "ImageError",
    "InputError",
    "NpConvNeXtError",
    "TrainingError",
    "VARIANTS",
    "create_model",
    "data_config",
    "get_config",
    "imagenet_classes",
    "imagenet_labels",
    "list_models",
    "list_pretrained",
    "load_state_dict",
    "preprocess",
    "set_num_threads",
]
