"""The same bits on AVX2 as on the machine running the tests (AVX-512 where it has it).

gemm.py sizes its tiles and depthwise.py its vectors to the host's registers, and LLVM splits
or joins the generic vectors of the intrinsics as the target has them; every output still sums
its products in one fixed order. A child process compiles the kernels for Haswell (AVX2, FMA,
no AVX-512, so 6 x 16 tiles instead of 12 x 32) into an empty JIT cache and runs the same
models: its outputs must equal this process's to the bit.
"""

import os
import subprocess
import sys

import llvmlite.binding
import numpy as np
import pytest

_RUN = """
import dataclasses, sys
import numpy as np
from npconvnext.config import ConvNeXtConfig
from npconvnext.engine import gemm
from npconvnext.model import ConvNeXt
from npconvnext.params import random_state_dict

# channel counts that fill whole vectors on both machines and ones that leave parts of them
v1 = ConvNeXtConfig("isa_test", depths=(1, 1, 1, 1), dims=(24, 40, 48, 72), num_classes=7)
v2 = dataclasses.replace(v1, use_grn=True, layer_scale=False, conv_mlp=True)
x = np.random.default_rng(1).standard_normal((2, 3, 64, 72))
outputs = {"tiles": np.array(gemm.TILES[np.dtype(np.float32)])}
for name, config in (("v1", v1), ("v2", v2)):
    for dtype in ("float32", "float64"):
        model = ConvNeXt(config, random_state_dict(config, seed=3), dtype=dtype)
        outputs[f"{name} {dtype}"] = model.forward_features(x.astype(dtype))
np.savez(sys.argv[1], **outputs)
"""


def _avx2_features():
    host = llvmlite.binding.get_host_cpu_features()
    return ",".join(("-" if name.startswith(("avx512", "amx", "avxvnni", "avxifma", "avxneconvert")) else
                     "+" if on else "-") + name for name, on in host.items())


def _run(path, env):
    subprocess.run([sys.executable, "-c", _RUN, str(path)], check=True, env=env, timeout=600)
    return dict(np.load(path))


@pytest.mark.skipif(not llvmlite.binding.get_host_cpu_features().get("avx512f"),
                    reason="the host has no AVX-512: its code is AVX2 code already")
def test_avx2_code_gives_the_hosts_bits(tmp_path):
    host = _run(tmp_path / "host.npz", dict(os.environ))
    avx2 = _run(tmp_path / "avx2.npz", dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=_avx2_features(),
                                            NUMBA_CACHE_DIR=str(tmp_path / "jit")))
    assert avx2["tiles"].tolist() == [6, 16]  # the child did compile for AVX2
    for key in host:
        if key != "tiles":
            np.testing.assert_array_equal(avx2[key], host[key], err_msg=key)
