"""AdamW as torch.optim.AdamW computes it, the cosine schedule, and layer-wise learning-rate decay.

Weight decay skips 1-D parameters (biases, norm scales, layer-scale gamma, GRN), as timm's
optimizer factory does; ConvNeXt's fine-tuning recipe adds layer-wise decay: blocks nearer the
input learn more slowly (`layer_decay_scales`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..config import ConvNeXtConfig
from ..engine import adamw
from ..errors import TrainingError
from ..model import ConvNeXt
from ..params import expected_shapes, to_compute_layout, to_timm_layout


def _lerp(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """start <- start + weight (end - start), in place, rounded as torch's lerp rounds."""
    if weight < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1.0 - weight)


class AdamW:
    """AdamW over a model's weights, updated in place (the model computes with them at once).

        m <- lerp(m, g, 1 - beta1);   v <- beta2 v + (1 - beta2) g^2
        p <- p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    with wd = 0 for 1-D parameters and for the model's frozen ones no update at all. On the
    numba backend each parameter is updated in one pass by a kernel doing the same steps.
    lr_scales: optional multiplier per timm name (see `layer_decay_scales`).
    """

    def __init__(self, model: ConvNeXt, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.05, lr_scales: Mapping[str, float] | None = None):
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.lr_scales = dict(lr_scales or {})
        self.steps = 0
        params = model.trainable_params()  # mapped weights copied once here, never written back
        self._shapes = expected_shapes(model.config)
        self._exp_avg = {name: np.zeros_like(p) for name, p in params.items()}
        self._exp_avg_sq = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """One update from gradients by timm name in timm's layouts (as `loss_and_grads` gives)."""
        missing = [name for name in self._shapes if name not in grads]
        if missing:
            raise TrainingError(f"no gradient for {len(missing)} weights, e.g. {missing[:3]}")
        misshaped = [f"{name}: {np.shape(grads[name])}, expected {shape}" for name, shape in self._shapes.items()
                     if tuple(np.shape(grads[name])) != shape]
        if misshaped:
            raise TrainingError(f"{len(misshaped)} gradients have the wrong shape: {'; '.join(misshaped[:3])}")
        params = self.model.trainable_params()
        self.steps += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1.0 - beta1 ** self.steps
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** self.steps)
        fused = self.model.backend == "numba"
        for name, shape in self._shapes.items():
            if name in self.model.frozen:
                continue
            param, m, v = params[name], self._exp_avg[name], self._exp_avg_sq[name]
            grad = to_compute_layout(name, np.asarray(grads[name], dtype=param.dtype))  # same elements, param's layout
            lr = self.lr * self.lr_scales.get(name, 1.0)
            if fused:  # the same steps in one pass (engine/adamw.py)
                decay = 1.0 - lr * self.weight_decay if len(shape) > 1 and self.weight_decay else 1.0
                adamw.adamw_update(param, _like(grad, param), m, v, decay, 1.0 - beta1, beta2,
                                              lr / bias_correction1, bias_correction2_sqrt, self.eps)
                continue
            if len(shape) > 1 and self.weight_decay:
                param *= 1.0 - lr * self.weight_decay
            _lerp(m, grad, 1.0 - beta1)
            v *= beta2
            v += (1.0 - beta2) * grad * grad
            denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
            param -= (lr / bias_correction1) * (m / denom)

    def state_dict(self) -> dict:
        """Everything `load_state_dict` needs to resume; moments in timm's layouts."""
        def timm(moments):
            return {n: np.array(to_timm_layout(n, a, self._shapes[n]), order="C") for n, a in moments.items()}

        return {"steps": self.steps, "lr": self.lr, "betas": tuple(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "exp_avg": timm(self._exp_avg),
                "exp_avg_sq": timm(self._exp_avg_sq)}

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["exp_avg"]) != set(self._shapes):
            raise TrainingError("optimizer state is for another architecture: its parameter names differ")
        self.steps, self.lr, self.eps, self.weight_decay = (int(state["steps"]), float(state["lr"]),
                                                            float(state["eps"]), float(state["weight_decay"]))
        self.betas = tuple(state["betas"])
        for moments, saved in ((self._exp_avg, state["exp_avg"]), (self._exp_avg_sq, state["exp_avg_sq"])):
            for name, array in moments.items():
                if tuple(np.shape(saved[name])) != self._shapes[name]:
                    raise TrainingError(f"optimizer state for {name} has shape {np.shape(saved[name])}, "
                                     f"expected {self._shapes[name]}")
                array[...] = to_compute_layout(name, np.asarray(saved[name], dtype=array.dtype))


def _like(array: np.ndarray, param: np.ndarray) -> np.ndarray:
    """array in param's memory layout (a copy only where it differs)."""
    if array.strides == param.strides:
        return array
    return np.array(array, order="F" if param.flags.f_contiguous and not param.flags.c_contiguous else "C")


def cosine_schedule(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
                    warmup_start_lr: float = 0.0, final_lr: float = 0.0) -> float:
    """The learning rate at `step` (0-based): linear warm-up from warmup_start_lr to base_lr over
    warmup_steps, then half a cosine down to final_lr at total_steps."""
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    t = min(step - warmup_steps, total_steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t))


_LAYER_GROUPS = 12  # the official recipe splits the network into 12 groups of about three blocks


def _layer_group(name: str) -> int:
    """Group of a timm-named weight in ConvNeXt's layer-wise decay: 0 stem ... 12 last stage,
    13 head. Each group is three consecutive blocks with the downsample before them, as the
    official fine-tuning code (its get_num_layer_for_convnext) groups [3, 3, 27, 3]."""
    if name.startswith("stem."):
        return 0
    if name.startswith("head."):
        return _LAYER_GROUPS + 1
    parts = name.split(".")
    stage = int(parts[1])
    if parts[2] == "downsample":
        return {1: 2, 2: 3, 3: _LAYER_GROUPS}[stage]
    block = int(parts[3])
    return {0: 1, 1: 2, 2: 3 + block // 3, 3: _LAYER_GROUPS}[stage]


def layer_decay_scales(config: ConvNeXtConfig, decay: float) -> dict[str, float]:
    """Learning-rate multiplier per timm name: decay ** (13 - group); the head learns at 1."""
    return {name: decay ** (_LAYER_GROUPS + 1 - min(_layer_group(name), _LAYER_GROUPS + 1))
            for name in expected_shapes(config)}
