"""Fine-tuning a ConvNeXt on a folder of images per class: the loop behind `npconvnext finetune`.

Each epoch: shuffle, augment, step AdamW along a cosine schedule with warm-up; then validate
(top-1) and write a checkpoint atomically: weights, optimizer moments, the epoch, the random
generator's state. A run resumed from a checkpoint continues as if it had never stopped, and
the final file is timm-named safetensors that timm and `npconvnext classify` load, with the
class names in its metadata.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..atomic import atomic_write
from ..config import get_config
from ..convention import TIMM
from ..errors import CheckpointError, TrainingError
from ..factory import create_model
from ..formats import read_safetensors_with_metadata
from ..formats.safetensors_writer import safetensors_chunks
from ..model import ConvNeXt
from ..params import init_state_dict
from ..preprocessing import DataConfig, data_config
from ..progress import bar as progress_bar
from . import data, loss_and_grads
from .optim import AdamW, cosine_schedule, layer_decay_scales

CHECKPOINT_FORMAT = "npconvnext-finetune-checkpoint-1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """What a fine-tuning run does; every field is a command-line option of the same name."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3              # peak learning rate, reached after the warm-up
    img_size: int = 224
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.1
    warmup_epochs: float = 0.0
    layer_decay: float | None = None  # ConvNeXt's fine-tuning recipe uses 0.7-0.8 for ImageNet
    val_split: float = 0.1
    seed: int = 0


@dataclass
class EpochReport:
    epoch: int               # 1-based
    loss: float              # mean training loss of the epoch
    val_top1: float | None   # None without validation images
    images_per_s: float
    skipped: int             # images that could not be read this epoch


def _checkpoint_path(output: str) -> str:
    root, _ = os.path.splitext(output)
    return root + ".checkpoint.safetensors"


def _data_config(model_name: str, img_size: int) -> DataConfig:
    """The evaluation transform at img_size: the architecture's own weights' mean and std."""
    try:
        base = data_config(model_name)
    except CheckpointError:  # no published weights for this architecture: timm's defaults
        base = DataConfig()
    return replace(base, input_size=(img_size, img_size))


def _as_timm_convention(model: ConvNeXt, source: str) -> dict:
    """Train `model` as timm's convention (NCHW, RGB, normalised by the caller, logits): a file
    whose model normalised inside (Keras) gives that normalisation to the preprocessing instead,
    in [0, 1] units. Returns the mean and std the preprocessing then uses."""
    convention = model.convention
    if convention.channel_order != "RGB":
        raise TrainingError(f"{source}: fine-tuning a model that takes BGR input is not supported; "
                            "convert it to timm's layout first (npconvnext convert)")
    normalisation = {}
    if convention.normalises_inside:
        unit = 255.0 if convention.scale == "255" else 1.0
        normalisation = {"mean": tuple(m / unit for m in convention.mean), "std": tuple(s / unit for s in convention.std)}
    model.convention = TIMM
    return normalisation


def _save_checkpoint(path: str, model: ConvNeXt, opt: AdamW, epoch: int, rng: np.random.Generator,
                     classes: tuple[str, ...], recipe: Recipe) -> None:
    state = opt.state_dict()
    tensors = {f"model/{k}": v.astype(np.float32) for k, v in model.state_dict().items()}
    tensors.update({f"exp_avg/{k}": v for k, v in state["exp_avg"].items()})
    tensors.update({f"exp_avg_sq/{k}": v for k, v in state["exp_avg_sq"].items()})
    scalars = {k: state[k] for k in ("steps", "lr", "betas", "eps", "weight_decay")}
    metadata = {"format": CHECKPOINT_FORMAT, "architecture": model.config.name, "epoch": str(epoch),
                "classes": json.dumps(list(classes)), "optimizer": json.dumps(scalars),
                "rng": json.dumps(rng.bit_generator.state), "recipe": json.dumps(asdict(recipe))}
    atomic_write(path, safetensors_chunks(tensors, metadata))


def _load_checkpoint(path: str, model: ConvNeXt, opt: AdamW, classes: tuple[str, ...],
                     recipe: Recipe, warn) -> tuple[int, np.random.Generator]:
    tensors, metadata = read_safetensors_with_metadata(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not an npconvnext fine-tuning checkpoint")
    if metadata.get("architecture") != model.config.name:
        raise TrainingError(f"{path}: a checkpoint of {metadata.get('architecture')}, not of {model.config.name}")

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        saved_classes = tuple(json.loads(metadata["classes"]))
        if saved_classes != tuple(classes):
            raise TrainingError(f"its classes {list(saved_classes)} are not this data's {list(classes)}")
        saved_recipe = json.loads(metadata["recipe"])
        changed = {k: (saved_recipe.get(k), v) for k, v in asdict(recipe).items() if saved_recipe.get(k) != v}
        fixed = [k for k in ("seed", "val_split", "batch_size") if k in changed]
        if fixed:  # another split or batching: the run would not continue the one it resumes
            raise TrainingError("the resumed run must keep " + ", ".join(
                f"{k} ({changed[k][0]}, not {changed[k][1]})" for k in fixed))
        if changed:
            warn(f"{path}: resuming with a changed recipe: " + ", ".join(
                f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
        model.load_state_dict(part("model/"), path)
        opt.load_state_dict(dict(json.loads(metadata["optimizer"]), exp_avg=part("exp_avg/"),
                                 exp_avg_sq=part("exp_avg_sq/")))
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(metadata["rng"])
        epoch = int(metadata["epoch"])
    except TrainingError as exc:
        raise TrainingError(f"{path}: {exc}") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise TrainingError(f"{path}: checkpoint does not fit {model.config.name} or is damaged "
                            f"({type(exc).__name__}: {exc})") from None
    return epoch, rng


def _batches(samples, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(samples))
    for start in range(0, len(order), batch_size):
        yield [samples[i] for i in order[start : start + batch_size]]


def _top1(model: ConvNeXt, samples, config: DataConfig, batch_size: int, warn) -> float | None:
    correct = total = 0
    for start in range(0, len(samples), batch_size):
        inputs, labels = [], []
        for path, label in samples[start : start + batch_size]:
            try:
                inputs.append(data.validation_input(path, config))
                labels.append(label)
            except (ValueError, OSError, MemoryError) as exc:  # ImageError and any other unreadable image
                warn(f"skipped {path}: {exc}")
        if inputs:
            predicted = model(np.stack(inputs).astype(model.dtype)).argmax(axis=1)
            correct += int((predicted == np.array(labels)).sum())
            total += len(labels)
    return correct / total if total else None


class Reporter:
    """Where a run tells how it goes: each batch to the caller's `progress` callback, or without
    one to a progress bar on stderr when that is a terminal; each epoch's line to the callback
    and to the `npconvnext` logger (INFO), marked as a result (the command prints it itself)."""

    def __init__(self, progress: Callable[[str], None] | None, steps: int):
        self.progress = progress
        self.bar = None if progress else progress_bar(steps, "finetune", unit="batch")

    def batch(self, message: str) -> None:
        if self.progress:
            self.progress(message)
        else:
            self.bar.set_description_str(message, refresh=False)
            self.bar.update(1)

    def epoch(self, message: str) -> None:
        if self.bar is not None:
            self.bar.clear()  # the line goes above the bar, wherever the logger writes it
        log.info(message, extra={"result": True})
        if self.progress:
            self.progress(message)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _inputs(batch, recipe: Recipe, config: DataConfig, rng, warn) -> tuple[list, list, int]:
    """The augmented inputs and labels of a batch of (path, label); unreadable images skipped."""
    inputs, labels, skipped = [], [], 0
    for path, label in batch:
        try:
            inputs.append(data.training_input(path, recipe.img_size, config, rng))
            labels.append(label)
        except (ValueError, OSError, MemoryError) as exc:  # ImageError and any other unreadable image
            skipped += 1
            warn(f"skipped {path}: {exc}")
    return inputs, labels, skipped


def finetune(data_dir: str, output: str, model_name: str | None = "convnext_tiny", weights: str | None = None,
             pretrained: str | None = None, recipe: Recipe = Recipe(), val_dir: str | None = None,
             resume: str | None = None, progress: Callable[[str], None] | None = None,
             warn: Callable[[str], None] = warnings.warn) -> list[EpochReport]:
    """Fine-tune `model_name` on `data_dir` (a folder per class), starting from `weights` (a file;
    model_name None reads the architecture off it), `pretrained` (a hub tag), or timm's init if
    neither; write the result to `output` and a resumable checkpoint beside it each epoch.
    Reports each batch to `progress` (or a progress bar on a terminal) and each epoch as one
    line to `progress` and the `npconvnext` logger (INFO). Returns one report per epoch run."""
    rng = np.random.default_rng(recipe.seed)
    folder = data.image_folder(data_dir)
    if val_dir:
        train_set, val_set = folder, data.image_folder(val_dir, folder.classes)
    elif recipe.val_split > 0:
        train_set, val_set = data.split(folder, recipe.val_split, rng)
    else:
        train_set, val_set = folder, folder._replace(samples=())
    classes = folder.classes
    if weights is None and pretrained is None:  # from scratch
        if model_name is None:
            raise TrainingError("name the architecture to train from scratch")
        config = get_config(model_name, num_classes=len(classes))
        model = ConvNeXt(config, init_state_dict(config, recipe.seed))
    else:
        model = create_model(model_name, weights=weights, pretrained=pretrained)
        if model.config.num_classes != len(classes):
            model.reset_classifier(len(classes), recipe.seed)
        normalisation = _as_timm_convention(model, weights or pretrained)
    scales = layer_decay_scales(model.config, recipe.layer_decay) if recipe.layer_decay else None
    opt = AdamW(model, lr=recipe.lr, weight_decay=recipe.weight_decay, lr_scales=scales)
    checkpoint = _checkpoint_path(output)
    start_epoch = 0
    if resume:
        start_epoch, rng = _load_checkpoint(resume, model, opt, classes, recipe, warn)
    config = _data_config(model.config.name, recipe.img_size)
    if weights is not None or pretrained is not None:
        config = replace(config, **normalisation)
    steps_per_epoch = -(-len(train_set.samples) // recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = int(recipe.warmup_epochs * steps_per_epoch)
    reports = []
    with Reporter(progress, (recipe.epochs - start_epoch) * steps_per_epoch) as reporter:
        for epoch in range(start_epoch, recipe.epochs):
            losses, seen, skipped, began = [], 0, 0, time.perf_counter()
            for batch_index, batch in enumerate(_batches(train_set.samples, recipe.batch_size, rng)):
                step = epoch * steps_per_epoch + batch_index
                inputs, labels, unread = _inputs(batch, recipe, config, rng, warn)
                skipped += unread
                if not inputs:
                    continue
                opt.lr = cosine_schedule(step, total_steps, recipe.lr, warmup_steps)
                loss, grads = loss_and_grads(model, np.stack(inputs), np.array(labels), recipe.label_smoothing,
                                             recipe.drop_path_rate, rng=rng)
                if not np.isfinite(loss):
                    kept = (f"the last good checkpoint is {checkpoint} (epoch {epoch})" if epoch
                            else "no checkpoint was written")
                    raise TrainingError(f"loss is {loss} at step {step + 1} (epoch {epoch + 1}, batch "
                                        f"{batch_index + 1}): stopped before updating the weights; {kept}")
                opt.step(grads)
                losses.append(loss)
                seen += len(inputs)
                rate = seen / (time.perf_counter() - began)
                reporter.batch(f"epoch {epoch + 1}/{recipe.epochs} batch {batch_index + 1}/{steps_per_epoch} "
                               f"loss {np.mean(losses):.4f} {rate:.1f} images/s")
            rate = seen / max(time.perf_counter() - began, 1e-9)
            top1 = _top1(model, val_set.samples, config, recipe.batch_size, warn)
            mean_loss = float(np.mean(losses)) if losses else float("nan")
            reports.append(EpochReport(epoch + 1, mean_loss, top1, rate, skipped))
            _save_checkpoint(checkpoint, model, opt, epoch + 1, rng, classes, recipe)
            reporter.epoch(f"epoch {epoch + 1}: loss {reports[-1].loss:.4f}, validation top-1 "
                           + (f"{100 * top1:.2f} %" if top1 is not None else "- (no validation images)")
                           + f", {rate:.1f} images/s, checkpoint {checkpoint}")
    write_weights(output, model, classes, config)
    return reports


def write_weights(path: str, model: ConvNeXt, classes: tuple[str, ...], config: DataConfig) -> None:
    """timm-named float32 safetensors with the class names and the evaluation transform (in timm's
    pretrained-config fields, as `formats.data_config.data_config_for_weights` reads them) in the metadata."""
    timm_cfg = {"input_size": [3, *config.input_size], "crop_pct": config.crop_pct, "crop_mode": config.crop_mode,
                "interpolation": config.interpolation, "mean": list(config.mean), "std": list(config.std)}
    metadata = {"architecture": model.config.name, "num_classes": str(model.config.num_classes),
                "class_names": json.dumps(list(classes)), "data_config": json.dumps(timm_cfg),
                "format": "pt", "converted_by": "npconvnext finetune"}
    atomic_write(path, safetensors_chunks({k: v.astype(np.float32) for k, v in model.state_dict().items()}, metadata))
