"""The options of `npconvnext` and its commands, as argparse parses them.

Every command takes --threads and --quiet; the ones that run a model on images take --model,
--weights, --dtype, --batch-size and --input-size. `--help` shows each option's default, and
the commands that read images list the exit status in their epilog.
"""

from __future__ import annotations

import argparse

from .. import __version__
from ..batch import DEFAULT_MODEL
from ..distributed.jobs import DEFAULT_PARTITION_SIZE
from ..explain_cli import add_commands as add_drawing_commands
from ..explain_cli import add_parity_plot
from . import commands
from .commands import EXIT_CODES


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (not where there is none, or the help names it), epilogs as written."""

    def _get_help_string(self, action):
        # `is`, not `in`: 0 and 0.0 equal False, and a default of 0 is worth showing
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npconvnext", formatter_class=Formatter, epilog=EXIT_CODES,
                                     description="ConvNeXt in NumPy: classify images, extract embeddings, "
                                     "evaluate, time, fine-tune, inspect and convert weights.")
    parser.add_argument("--version", action="version", version=f"npconvnext {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=at_least_one, default=None, metavar="N",
                        help="threads for the model's kernels and BLAS (default: NPCONVNEXT_NUM_THREADS, "
                        "or one per core)")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no notes: only results, warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, run, help, epilog=None):
        p = sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=Formatter,
                           epilog=epilog)
        p.set_defaults(run=run)
        return p

    _add_image_commands(add)
    _add_finetune(add)
    _add_trace_commands(add)
    add_drawing_commands(add)  # explain, erf
    _add_file_commands(add)
    return parser


def _model_options(p, batch_size=8):
    p.add_argument("--model", default=None, help=f"architecture or arch.tag (default {DEFAULT_MODEL}; "
                   "with --weights, read off the file)")
    p.add_argument("--weights", help="a local weight file (any supported format) instead of downloading")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                   help="the model's precision")  # bfloat16: docs/speed.md
    p.add_argument("--batch-size", type=at_least_one, default=batch_size, help="images per forward pass")
    p.add_argument("--input-size", type=at_least_one, default=None,
                   help="the crop size (default: the weights' own, 224 for most tags)")


def _job_options(p):
    p.add_argument("--scheduler", default=None, metavar="ADDRESS|local[:N]",
                   help="run on a Dask cluster: a scheduler's address (or scheduler file), or N local "
                   "worker processes (local: one per core); the results go to the --output directory")
    p.add_argument("--partition-size", type=at_least_one, default=DEFAULT_PARTITION_SIZE, metavar="N",
                   help="with --output: images per task and per output file")


def _add_image_commands(add) -> None:
    """classify, features, evaluate, benchmark: images through a model."""
    p = add("classify", commands.cmd_classify, "top-k classes per image (ImageNet's, or the weights' own)",
            EXIT_CODES)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _model_options(p)
    p.add_argument("--top-k", type=at_least_one, default=5, help="classes per image")
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per input image: "
                   '{"file", "labels", "indices", "probabilities"}, or {"file", "error"} for one not read')
    p.add_argument("--output", default=None, metavar="OUT",
                   help="write JSON Lines partitions to the directory OUT, resumably (with or without --scheduler)")
    _job_options(p)

    p = add("features", commands.cmd_features, "pooled pre-logits embeddings to a .npy file", EXIT_CODES)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _model_options(p)
    p.add_argument("-o", "--output", required=True,
                   help="the .npy file; with --scheduler, the directory of .npy partitions")
    _job_options(p)

    p = add("evaluate", commands.cmd_evaluate, "top-1/top-5, per class and in all, over a folder of class "
            "folders named as the model's classes (ImageNet WordNet ids, or a fine-tuned file's class names)",
            EXIT_CODES)
    p.add_argument("directory")
    _model_options(p)
    p.add_argument("--limit", type=at_least_one, default=None, metavar="N",
                   help="evaluate N images: a random subset drawn with --seed, balanced over the classes "
                   "(as equal a count per class as N allows), not the first N files")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--report", default=None, help="write a JSON report here (totals, per class, confusion matrix)")

    p = add("benchmark", commands.cmd_benchmark, "latency (median, p90) and throughput on random input")
    _model_options(p, batch_size=1)
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights instead of a file or tag: for timing only")
    p.add_argument("--seconds", type=positive, default=10.0, help="how long to run the timed batches")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def _add_finetune(add) -> None:
    p = add("finetune", commands.cmd_finetune, "train on a folder of images per class; write timm-named weights")
    p.add_argument("data_dir", metavar="DATA_DIR", help="one sub-folder of images per class")
    p.add_argument("--model", default=None, help="architecture or arch.tag (default convnext_tiny; "
                   "with --weights, read off the file)")
    p.add_argument("--weights", help="start from this weight file (any supported format)")
    p.add_argument("--pretrained", help="start from these published weights' tag, e.g. fb_in1k "
                   "(neither --weights nor --pretrained: timm's init, from scratch)")
    p.add_argument("--epochs", type=at_least_one, default=1, help="passes over the training images")
    p.add_argument("--batch-size", type=at_least_one, default=32, help="images per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--img-size", type=at_least_one, default=224, help="side of the training crops")
    p.add_argument("--val-split", type=float, default=None,
                   help="fraction of each class held out (default: 0.1, or 0 with --val-dir)")
    p.add_argument("--val-dir", default=None, help="a validation folder with the same class folders")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's decoupled weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy's targets")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine")
    p.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise learning-rate decay, e.g. 0.8 (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the augmentation and drop path")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint of an earlier run")
    p.add_argument("-o", "--output", required=True, help="the weights to write (.safetensors)")


def _add_trace_commands(add) -> None:
    """summary, golden, parity: a model's layers and activations."""
    p = add("summary", commands.cmd_summary, "layer-by-layer output shapes, parameters and MACs")
    p.add_argument("model", help="an architecture, e.g. convnext_tiny")
    p.add_argument("--input-size", type=at_least_one, default=224, help="side of the input image")

    def trace_options(p):
        p.add_argument("--model", default=None, help="architecture (default convnext_tiny, or the golden file's)")
        p.add_argument("--weights", help="weight file; default: npconvnext's seeded random weights")
        p.add_argument("--weight-seed", type=int, default=None,
                       help="seed of the random weights (default 0, or the golden file's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random input")
        p.add_argument("--input-size", type=at_least_one, default=224, help="side of the random input")
        p.add_argument("--float64", action="store_true", help="run and store float64")

    p = add("golden", commands.cmd_golden, "write the input and every activation to a safetensors file")
    trace_options(p)
    p.add_argument("--image", default=None, help="use this photo (timm's eval preprocessing) as input")
    p.add_argument("-o", "--output", required=True)

    p = add("parity", commands.cmd_parity, "layer-by-layer errors against timm, or against a golden file")
    trace_options(p)
    p.add_argument("--against", default=None, help="a golden file (from `npconvnext golden` or elsewhere)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative error; 0 demands equality (default 1e-4 f32, 1e-10 f64)")
    add_parity_plot(p)


def _add_file_commands(add) -> None:
    """download, convert, verify: weight files."""
    p = add("download", commands.cmd_download, "fetch pretrained weights into the huggingface-hub cache; "
            "print the file's path, and how to take it to a machine without internet")
    p.add_argument("name", help="arch.tag, e.g. convnext_tiny.fb_in1k")

    p = add("convert", commands.cmd_convert, "any supported checkpoint -> timm-named float32 safetensors")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--arch", default=None, help="the architecture, where the file does not tell (default: read off "
                   "the weights; a file without head.fc is a headless backbone, num_classes 0, either way)")
    p.add_argument("--force", action="store_true", help="overwrite DST")

    p = add("verify", commands.cmd_verify, "check a converted file against its source: the sha256 recorded "
            "by convert, and every tensor against a fresh conversion")
    p.add_argument("converted", help="a file written by `npconvnext convert`")
    p.add_argument("source", help="the checkpoint it was converted from")
