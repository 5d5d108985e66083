"""Helpers the tests share: timm models with re-randomised weights, a SavedModel writer run in a
subprocess, counters of Numba's parallel loops, and the paths of the repository's test data."""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
ROOT = os.path.dirname(TESTS)  # the repository
DATA = os.path.join(TESTS, "data")  # the photos the tests classify (SOURCES.md says whose)

# Architectures timm registers that npconvnext does not build yet, each with why: the tests that
# build every architecture or every published tag skip exactly these. Whoever builds one removes it.
NOT_BUILT_YET: dict[str, str] = {}  # every timm ConvNeXt is built

# The environment as the test session started (conftest imports this first): libraries the
# tests import in-process (OpenVINO, Keras, Dask) may add variables a fresh process must not inherit.
STARTING_ENVIRON = dict(os.environ)
