"""The engine's parallel loops, and a fixture that runs the wrappers serially or in parallel."""

import contextlib

import pytest

from npconvnext.engine import adamw, bfloat16, depthwise, grn, layernorm, linear, mlp
from tests.support import parallel_loops

# every kernel's parallel loop, by name, in the layer module that holds it
LAYER_MODULES = (depthwise, layernorm, linear, mlp, grn, adamw, bfloat16)
PARALLEL_LOOPS = {module: [name for name, f in vars(module).items()
                           if getattr(f, "targetoptions", {}).get("parallel")] for module in LAYER_MODULES}
# the forward's, which inference runs; the others run in training only
FORWARD_LOOPS = {"_depthwise_conv7_layer_norm", "_layer_norm", "_global_response_norm_", "_linear_gelu_panels",
                 "_panels_linear", "_mlp"}
# timm's own variants' forward (test_forward.py): the RMS and simple norms, GELU outside the blocks
VARIANT_LOOPS = {"_rms_or_simple_norm", "_gelu"}
# a bfloat16 model's forward (test_bfloat16.py): pair panels, and fc1 + GELU and the MLP on them;
# the last two are the float forward's kernels, compiled for pair panels there
BFLOAT16_LOOPS = {"_to_pair_panels", "_linear_gelu_panels", "_mlp"}


@pytest.fixture(params=[1, 2], ids=["serial", "parallel"])
def kernel_threads(request, monkeypatch):
    """One thread: every wrapper runs its kernel's row body on this thread; two: the parallel
    loops. Yields one set per layer module, of the names of its parallel loops that ran, filled
    in as they run: `set().union(*kernel_threads)` are all that ran."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(parallel_loops.counted(module, names, request.param, monkeypatch))
               for module, names in PARALLEL_LOOPS.items()]
