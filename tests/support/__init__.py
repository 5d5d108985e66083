"""Helpers the tests share: timm models with re-randomised weights, a SavedModel writer run in a
subprocess, counters of Numba's parallel loops, and the paths of the repository's test data."""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
ROOT = os.path.dirname(TESTS)  # the repository
DATA = os.path.join(TESTS, "data")  # the photos the tests classify (SOURCES.md says whose)

# Architectures timm registers that npconvnext does not build yet, each with why: the tests that
# build every architecture or every published tag skip exactly these. Whoever builds one removes it.
NOT_BUILT_YET = {
    "convnext_atto_ols": "overlapping tiered stem (stem_type='overlap_tiered') not built yet",
    "convnext_femto_ols": "overlapping tiered stem (stem_type='overlap_tiered') not built yet",
    "convnext_pico_ols": "overlapping tiered stem (stem_type='overlap_tiered') not built yet",
    "convnext_nano_ols": "overlapping tiered stem (stem_type='overlap_tiered') not built yet",
    "convnext_atto_rms": "RMS norm (norm_layer='rmsnorm2d') not built yet",
    "convnext_zepto_rms": "RMS norm (norm_layer='rmsnorm2d') not built yet",
    "convnext_zepto_rms_ols": "RMS norm and the overlapping stem not built yet",
    "convnext_tiny_hnf": "head norm first (head_norm_first=True) not built yet",
    "convnext_large_mlp": "the MLP head (head_hidden_size, pre-logits layer) not built yet",
}
