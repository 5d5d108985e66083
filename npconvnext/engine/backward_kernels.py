"""Transitional: train/optim.py's `backward_kernels.adamw_update`, now engine/adamw.py's.
Delete this module once optim.py imports `from ..engine import adamw`."""

from .adamw import adamw_update

__all__ = ["adamw_update"]
