"""timm models with random but realistic weights: the ground truth the tests compare against.

timm's own init sets every layer-scale gamma to 1e-6 and GRN to zero, which turns every block
into (almost) the identity: a model with a broken block would still match. So the models here
are built without init (on the meta device) and every parameter is drawn afresh by the kind of
module it belongs to, independently of npconvnext's own random weights.
"""

from __future__ import annotations

import numpy as np
import timm
import torch


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=gen)

    touched = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                kind = type(module).__name__
                if param_name == "gamma":                       # layer scale: 0.1 .. 1, not 1e-6
                    value = uniform(param.shape, 0.1, 1.0)
                elif kind.startswith(("LayerNorm", "RmsNorm", "SimpleNorm")) and param_name == "weight":
                    value = uniform(param.shape, 0.5, 1.5)
                elif kind == "GlobalResponseNorm":             # GRN gamma and beta, not zeros
                    value = normal(param.shape, 0.5)
                elif param_name == "bias":
                    value = normal(param.shape, 0.2)
                elif kind in ("Conv2d", "Linear"):
                    fan_in = param[0].numel()
                    value = normal(param.shape, fan_in ** -0.5)
                else:
                    raise AssertionError(f"no rule to randomise {full} ({kind})")
                param.copy_(value)
                touched.add(full)
    untouched = {name for name, _ in model.named_parameters()} - touched
    assert not untouched, f"parameters left at their init: {sorted(untouched)}"


def random_timm_model(name: str, seed: int = 0, num_classes: int = 1000) -> torch.nn.Module:
    """timm's `name` built with pretrained=False, every parameter re-randomised, in eval mode."""
    with torch.device("meta"):  # skip timm's init: it would be overwritten anyway, and is slow
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    model = model.to_empty(device="cpu")
    _randomise(model, seed)
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """timm's state dict as NumPy arrays (shared memory, no copy)."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def run_timm(model: torch.nn.Module, x: np.ndarray, record_modules: bool = False) -> dict[str, np.ndarray]:
    """Logits, forward_features and pre-logits of a timm model, in the dtype of x; with
    `record_modules`, also "modules": every named module's output, by forward hooks."""
    model = model.to(torch.float64 if x.dtype == np.float64 else torch.float32)
    modules, hooks = {}, []
    if record_modules:
        for name, module in model.named_modules():
            if name:
                hooks.append(module.register_forward_hook(
                    lambda m, args, result, name=name: modules.__setitem__(name, result.detach().numpy().copy())))
    try:
        with torch.no_grad():
            features = model.forward_features(torch.from_numpy(x))
            out = {
                "features": features.numpy(),
                "pre_logits": model.forward_head(features, pre_logits=True).numpy(),
                "logits": model.forward_head(features).numpy(),
            }
    finally:
        for hook in hooks:
            hook.remove()
    return dict(out, modules=modules) if record_modules else out


def random_images(shape, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Normalised-image-like input: standard normal, as ImageNet-normalised pixels roughly are."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
