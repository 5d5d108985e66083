"""npconvnext: ConvNeXt image classification in NumPy, matching timm, with no deep-learning framework."""

import os

# Numba kernels and BLAS calls alternate many times per forward pass, and each side's idle
# threads busy-wait on the cores the other needs next: with the defaults, convnext_tiny ran at
# half speed here. Both settings are read once, when the OpenMP runtime and OpenBLAS start, so
# they only act if npconvnext is imported before numpy; a value the user set always wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .checkpoints import CheckpointError, load_state_dict
from .config import VARIANTS, ConvNeXtConfig, get_config, list_models
from .labels import imagenet_classes, imagenet_labels
from .model import ConvNeXt, create_model
from .preprocess import DataConfig, data_config, preprocess
from .threads import set_num_threads

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DataConfig",
    "data_config",
    "imagenet_classes",
    "imagenet_labels",
    "preprocess",
    "ConvNeXt",
    "ConvNeXtConfig",
    "VARIANTS",
    "create_model",
    "get_config",
    "list_models",
    "load_state_dict",
    "set_num_threads",
]
