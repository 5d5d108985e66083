"""npconvnext's own error types: every refusal a user can meet is one of these.

Each subclasses ValueError as well, so code written against the earlier ValueErrors still
catches them. Messages name the file (or input) and the problem.
"""


class NpConvNeXtError(ValueError):
    """Base of every error npconvnext raises on purpose."""


class CheckpointError(NpConvNeXtError):
    """A weight file or mapping that cannot be used."""


class ImageError(NpConvNeXtError):
    """An image that cannot be read or is past the size limits."""


class InputError(NpConvNeXtError):
    """An argument that does not fit: an array given to a model (shape, dtype, size), an unknown
    architecture, a thread count, a preprocessing setting."""


class TrainingError(NpConvNeXtError):
    """A training run that cannot go on: bad data folders, labels, resume files, a NaN loss."""
