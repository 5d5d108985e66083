"""adamw.py's update against train/optim.py's NumPy steps, to the bit."""

import numba
import numpy as np
import pytest


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # both ways of torch's lerp: weight 1 - beta1 below and above 0.5
def test_adamw_kernel_equals_the_numpy_steps_to_the_bit(dtype, beta1, kernel_threads):
    import npconvnext
    from npconvnext import train
    from npconvnext.params import random_state_dict

    config = npconvnext.get_config("convnext_atto", num_classes=3)  # fc weights beyond one chunk of AdamW
    state = random_state_dict(config, seed=2)
    models = {backend: npconvnext.model.ConvNeXt(config, state, dtype=dtype, backend=backend)
              for backend in ("numpy", "numba")}
    models["numpy"].requires_grad_("stem.1", False)
    models["numba"].requires_grad_("stem.1", False)
    opts = {backend: train.AdamW(model, lr=3e-3, betas=(beta1, 0.99), weight_decay=0.1,
                                 lr_scales={"head.fc.weight": 0.5}) for backend, model in models.items()}
    rng = np.random.default_rng(5)
    for _ in range(3):
        grads = {name: rng.standard_normal(v.shape).astype(dtype) for name, v in state.items()}
        for opt in opts.values():
            opt.step(grads)
    numpy_state, numba_state = models["numpy"].state_dict(), models["numba"].state_dict()
    for name, value in numpy_state.items():
        np.testing.assert_array_equal(numba_state[name], value, err_msg=name)
    assert not np.array_equal(numpy_state["stages.3.blocks.1.mlp.fc1.weight"], state["stages.3.blocks.1.mlp.fc1.weight"])
    np.testing.assert_array_equal(numba_state["stem.1.weight"], state["stem.1.weight"])  # frozen
    for which in ("exp_avg", "exp_avg_sq"):
        for name, value in opts["numpy"].state_dict()[which].items():
            np.testing.assert_array_equal(opts["numba"].state_dict()[which][name], value, err_msg=name)
    assert set().union(*kernel_threads) == ({"_adamw"} if numba.get_num_threads() > 1 else set())
