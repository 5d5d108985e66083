"""The `npconvnext` command: classify, features, evaluate, summary, download, convert, verify,
golden, parity.

This module parses arguments and prints; the work is done by the modules it calls: batch.py
(classify, features), evaluate.py, distributed/ (--scheduler, --output), oracle.py (golden,
parity), convert.py, summary.py, train/finetune.py, hub.py.

A bad input never shows a traceback: npconvnext's own errors, OS errors and the refusals here
are printed as one line naming the problem, with exit status 1. File names are printed with
undecodable bytes as backslash escapes, so any name prints on any terminal.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from dataclasses import replace

import numpy as np

from . import batch
from .atomic import atomic_write
from .batch import DEFAULT_MODEL
from .distributed.jobs import DEFAULT_PARTITION_SIZE
from .errors import NpConvNeXtError


class CommandError(Exception):
    """An error to print as one line on stderr with exit status 1."""


_shown = batch.shown  # a file name as printable text (see batch.shown)
_describe = batch.describe  # an error as the text a user needs


def _image_paths(inputs: list[str]) -> list[str]:
    return batch.list_images(inputs)


def _model_spec(args) -> batch.ModelSpec:
    return batch.ModelSpec(args.model, args.weights, input_size=args.input_size)


def _load_model(args):
    """The model and the preprocessing that gives it its input (see batch.load_model)."""
    return batch.load_model(_model_spec(args))


def _progress(done: int, total: int) -> None:
    if total > 4 and (sys.stderr.isatty() or os.environ.get("NPCONVNEXT_PROGRESS")):
        width = 30
        filled = width * done // total
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)


def _batches(paths, config, batch_size):
    """(paths, inputs) per batch; an image that cannot be read or preprocessed, for whatever
    reason (a bad file, an I/O error, too big for memory), is warned about and skipped."""
    for start in range(0, len(paths), batch_size):
        good, x, failed = batch.read_batch(paths[start : start + batch_size], config)
        for reason in failed.values():
            print(f"warning: skipped {reason}", file=sys.stderr)
        if good:
            yield good, x
        _progress(min(start + batch_size, len(paths)), len(paths))


def cmd_classify(args):
    if args.scheduler or args.output:
        return _run_job(args, "classify")
    model, config = _load_model(args)
    classified = 0
    for paths, x in _batches(_image_paths(args.inputs), config, args.batch_size):
        classified += len(paths)
        for path, prediction in zip(paths, batch.classify(model, x, args.top_k)):
            if args.json:
                print(json.dumps(batch.classified_row(path, prediction)))
            else:
                print(_shown(path))
                for i, name, p in zip(prediction.indices, prediction.names, prediction.probabilities):
                    print(f"  {p:7.2%}  {name} ({i})")
    if not classified:
        raise CommandError("none of the images could be read (see the warnings above)")


def _run_job(args, task: str) -> None:
    """classify/features --scheduler ... --output OUT: a partitioned, resumable job
    (npconvnext/distributed); classify --output without --scheduler runs it in this process."""
    from npconvnext.distributed import Job, run

    if not args.output:
        raise CommandError("--scheduler needs --output OUT, the directory the results go to")
    weights = os.path.abspath(args.weights) if args.weights else None  # the workers read it at this path
    job = Job(task, replace(_model_spec(args), weights=weights), top_k=getattr(args, "top_k", 5),
              batch_size=args.batch_size, partition_size=args.partition_size)
    paths = _image_paths(args.inputs)
    if args.scheduler:
        try:
            from npconvnext.distributed import cluster
        except ImportError as exc:
            raise CommandError(f"--scheduler needs Dask ({exc}): pip install \"npconvnext[dask]\"") from None
        with cluster.connect(args.scheduler) as client:
            summary = run(client, paths, args.output, job, progress=_progress)
    else:
        summary = run(None, paths, args.output, job, progress=_progress)
    print(f"{summary.images} images in {summary.partitions} partitions -> {_shown(summary.output)} "
          f"({summary.computed} run now, {summary.skipped} finished before); "
          f"{summary.failed} could not be read (their rows hold the error)")
    if summary.failed == summary.images:
        raise CommandError(f"none of the {summary.images} images could be read (see the errors in "
                           f"{_shown(summary.output)}/part-*.jsonl)")


def cmd_features(args):
    if args.scheduler:
        return _run_job(args, "features")
    model, config = _load_model(args)
    files, chunks = [], []
    for paths, x in _batches(_image_paths(args.inputs), config, args.batch_size):
        chunks.append(batch.embed(model, x))
        files += paths
    if not chunks:
        raise CommandError("none of the images could be read (see the warnings above); nothing written")
    embeddings = np.concatenate(chunks)
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    atomic_write(args.output, buffer.getvalue())
    order = os.path.splitext(args.output)[0] + ".files.txt"
    atomic_write(order, b"".join(os.fsencode(f) + b"\n" for f in files))  # the names' exact bytes
    print(f"{embeddings.shape[0]} embeddings of size {embeddings.shape[1]} -> {_shown(args.output)} "
          f"(file order: {_shown(order)})")


def cmd_evaluate(args):
    from npconvnext import evaluate

    model, config = _load_model(args)
    by_class = evaluate.class_folders(args.directory)
    if args.limit:
        by_class = evaluate.balanced_subset(by_class, args.limit, args.seed)
    truth = evaluate.ground_truth(by_class)
    counts = evaluate.accuracy(model, _batches(list(truth), config, args.batch_size), truth)
    if not counts.images:
        raise CommandError(f"{_shown(args.directory)}: none of the {len(truth)} images could be read "
                           "(see the warnings above)")
    report = counts.report(args.model, args.weights)
    print(f"top-1 {report['top1']:.2f} %  top-5 {report['top5']:.2f} %  over {counts.images} images")
    if args.report:
        atomic_write(args.report, json.dumps(report, indent=2).encode())


def cmd_finetune(args):
    from npconvnext.train.finetune import Recipe, finetune

    if args.val_dir and args.val_split is not None:
        raise CommandError("give --val-split or --val-dir, not both")
    name = args.model or ("" if args.weights else "convnext_tiny")  # with --weights: read off the file
    arch, _, tag = name.partition(".")
    if args.pretrained and args.weights:
        raise CommandError("give --weights or --pretrained, not both")
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, img_size=args.img_size,
                    weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                    drop_path_rate=args.drop_path, warmup_epochs=args.warmup_epochs, layer_decay=args.layer_decay,
                    val_split=0.0 if args.val_dir else (0.1 if args.val_split is None else args.val_split),
                    seed=args.seed)
    show = sys.stderr.isatty() or os.environ.get("NPCONVNEXT_PROGRESS")

    def progress(message):
        if message.startswith("epoch") and ": loss" in message:  # an epoch's summary: keep it on screen
            print(("\r" if show else "") + message, file=sys.stderr, flush=True)
        elif show:
            print("\r" + message, end="", file=sys.stderr, flush=True)

    def warn(message):
        print(f"warning: {_shown(message)}", file=sys.stderr)

    pretrained = args.pretrained or (tag if tag and not args.weights else None)  # with --weights, a tag only names
    reports = finetune(args.data_dir, args.output, arch or None, weights=args.weights, pretrained=pretrained,
                       recipe=recipe, val_dir=args.val_dir, resume=args.resume, progress=progress, warn=warn)
    for r in reports:
        top1 = f"{100 * r.val_top1:.2f} %" if r.val_top1 is not None else "-"
        print(f"epoch {r.epoch}: loss {r.loss:.4f}, validation top-1 {top1}, {r.images_per_s:.1f} images/s")
    print(f"{args.output}: timm-named weights with the class names (checkpoint beside it)")


def cmd_summary(args):
    import npconvnext
    from npconvnext.summary import format_summary

    print(format_summary(npconvnext.get_config(args.model), (args.input_size, args.input_size)))


def cmd_download(args):
    from npconvnext.hub import download_weights

    print(download_weights(args.name))


def cmd_convert(args):
    from npconvnext.convert import convert

    meta = convert(args.src, args.dst, arch=args.arch, force=args.force)
    print(f"{_shown(args.dst)}: {meta['architecture']} from {meta['source_format']} "
          f"(source sha256 {meta['source_sha256']})")


def cmd_verify(args):
    from npconvnext.convert import verify

    meta = verify(args.converted, args.source)
    print(f"{_shown(args.converted)}: OK: {meta['architecture']} converted from {_shown(args.source)} "
          f"(sha256 {meta['source_sha256']}); every tensor equals a fresh conversion")


def _traced_model(args):
    """Model, input and metadata for golden/parity: --weights or seeded random weights."""
    from npconvnext.oracle import traced_model

    return traced_model(args.model, args.weights, "float64" if args.float64 else "float32", args.weight_seed,
                        args.seed, args.input_size, getattr(args, "image", None))


def cmd_golden(args):
    from npconvnext.oracle import write_golden

    model, x, meta = _traced_model(args)
    trace = model.trace(x)
    write_golden(trace, args.output, meta)
    size = sum(a.nbytes for a in trace.values())
    print(f"{args.output}: {len(trace)} tensors, {size / 1e6:.1f} MB of {meta['dtype']}, {meta['architecture']}")


def cmd_parity(args):
    from npconvnext.oracle import TOLERANCE, compare, format_table, golden_weights, read_golden, timm_trace

    if args.tolerance is not None and not args.tolerance >= 0:
        raise CommandError(f"--tolerance must be 0 or more, not {args.tolerance:g}")
    if args.against:
        expected, meta = read_golden(args.against)
        dtype = "float64" if expected["input"].dtype == np.float64 else "float32"
        args.float64 = dtype == "float64"
        args.model = args.model or meta.get("architecture")
        args.weight_seed = golden_weights(args.against, meta, args.weights, args.weight_seed)
        model, _, _ = _traced_model(args)
        actual = model.trace(expected["input"])
        source = args.against
    else:
        model, x, _ = _traced_model(args)
        actual = model.trace(x)
        try:
            expected = timm_trace(model, x, list(actual))
        except ImportError:
            raise CommandError("timm is not installed: install it, or compare with --against FILE") from None
        source, dtype = "timm", model.dtype.name
    tolerance = TOLERANCE[dtype] if args.tolerance is None else args.tolerance
    rows = compare(actual, expected, tolerance)
    print(f"npconvnext {model.config.name} ({dtype}) against {source}")
    print(format_table(rows, tolerance))
    if not all(r.ok for r in rows):
        raise CommandError(f"parity failed: {sum(not r.ok for r in rows)} tensors past tolerance {tolerance:g}")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npconvnext", description="ConvNeXt in NumPy: classify images, "
                                     "extract embeddings, evaluate, inspect and convert weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_image_commands(sub)
    _add_finetune(sub)
    _add_trace_commands(sub)
    _add_file_commands(sub)
    return parser


def _add_image_commands(sub) -> None:
    """classify, features, evaluate: images through a model."""

    def model_options(p):
        p.add_argument("--model", default=None, help=f"architecture or arch.tag (default {DEFAULT_MODEL}; "
                       "with --weights, read off the file)")
        p.add_argument("--weights", help="a local weight file (any supported format) instead of downloading")
        p.add_argument("--batch-size", type=_at_least_one, default=8)
        p.add_argument("--input-size", type=_at_least_one, default=None, help="override the crop size")

    def job_options(p):
        p.add_argument("--scheduler", default=None, metavar="ADDRESS|local[:N]",
                       help="run on a Dask cluster: a scheduler's address (or scheduler file), or N local "
                       "worker processes (local: one per core); the results go to the --output directory")
        p.add_argument("--partition-size", type=_at_least_one, default=DEFAULT_PARTITION_SIZE, metavar="N",
                       help=f"with --output: images per task and per output file (default {DEFAULT_PARTITION_SIZE})")

    p = sub.add_parser("classify", help="top-k ImageNet classes per image")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    model_options(p)
    p.add_argument("--top-k", type=_at_least_one, default=5)
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per image")
    p.add_argument("--output", default=None, metavar="OUT",
                   help="write JSON Lines partitions to the directory OUT, resumably (with or without --scheduler)")
    job_options(p)
    p.set_defaults(run=cmd_classify)

    p = sub.add_parser("features", help="pooled pre-logits embeddings to a .npy file")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    model_options(p)
    p.add_argument("-o", "--output", required=True,
                   help="the .npy file; with --scheduler, the directory of .npy partitions")
    job_options(p)
    p.set_defaults(run=cmd_features)

    p = sub.add_parser("evaluate", help="top-1/top-5 over an ImageNet-style folder (one sub-folder per wnid)")
    p.add_argument("directory")
    model_options(p)
    p.add_argument("--limit", type=_at_least_one, default=None, metavar="N",
                   help="evaluate N images: a random subset drawn with --seed, balanced over the classes "
                   "(as equal a count per class as N allows), not the first N files")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.set_defaults(run=cmd_evaluate)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train on a folder of images per class; write timm-named weights")
    p.add_argument("data_dir", metavar="DATA_DIR", help="one sub-folder of images per class")
    p.add_argument("--model", default=None, help="architecture or arch.tag (default convnext_tiny; "
                   "with --weights, read off the file)")
    p.add_argument("--weights", help="start from this weight file (any supported format)")
    p.add_argument("--pretrained", help="start from these published weights' tag, e.g. fb_in1k "
                   "(neither --weights nor --pretrained: timm's init, from scratch)")
    p.add_argument("--epochs", type=_at_least_one, default=1)
    p.add_argument("--batch-size", type=_at_least_one, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--img-size", type=_at_least_one, default=224)
    p.add_argument("--val-split", type=float, default=None, help="fraction of each class held out (default 0.1)")
    p.add_argument("--val-dir", default=None, help="a validation folder with the same class folders")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning-rate decay, e.g. 0.8")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the augmentation and drop path")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint of an earlier run")
    p.add_argument("-o", "--output", required=True, help="the weights to write (.safetensors)")
    p.set_defaults(run=cmd_finetune)


def _add_trace_commands(sub) -> None:
    """summary, golden, parity: a model's layers and activations."""
    p = sub.add_parser("summary", help="layer-by-layer output shapes, parameters and MACs")
    p.add_argument("model")
    p.add_argument("--input-size", type=_at_least_one, default=224)
    p.set_defaults(run=cmd_summary)

    def trace_options(p):
        p.add_argument("--model", default=None, help="architecture (default convnext_tiny, or the golden file's)")
        p.add_argument("--weights", help="weight file; default: npconvnext's seeded random weights")
        p.add_argument("--weight-seed", type=int, default=None,
                       help="seed of the random weights (default 0, or the golden file's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random input")
        p.add_argument("--input-size", type=_at_least_one, default=224)
        p.add_argument("--float64", action="store_true", help="run and store float64")

    p = sub.add_parser("golden", help="write the input and every activation to a safetensors file")
    trace_options(p)
    p.add_argument("--image", default=None, help="use this photo (timm's eval preprocessing) as input")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(run=cmd_golden)

    p = sub.add_parser("parity", help="layer-by-layer errors against timm, or against a golden file")
    trace_options(p)
    p.add_argument("--against", default=None, help="a golden file (from `npconvnext golden` or elsewhere)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative error; 0 demands equality (default 1e-4 f32, 1e-10 f64)")
    p.set_defaults(run=cmd_parity)


def _add_file_commands(sub) -> None:
    """download, convert, verify: weight files."""
    p = sub.add_parser("download", help="fetch pretrained weights into the huggingface-hub cache")
    p.add_argument("name", help="arch.tag, e.g. convnext_tiny.fb_in1k")
    p.set_defaults(run=cmd_download)

    p = sub.add_parser("convert", help="any supported checkpoint -> timm-named float32 safetensors")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--arch", default=None)
    p.add_argument("--force", action="store_true", help="overwrite DST")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("verify", help="check a converted file against its source: the sha256 recorded "
                       "by convert, and every tensor against a fresh conversion")
    p.add_argument("converted", help="a file written by `npconvnext convert`")
    p.add_argument("source", help="the checkpoint it was converted from")
    p.set_defaults(run=cmd_verify)


class _NotesOnStderr(logging.Handler):
    """The library's INFO notes (Numba compiling the kernels on a cold cache) as lines on stderr:
    the command is the program, so it chooses where they go."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"npconvnext: {record.getMessage()}", file=sys.stderr, flush=True)  # whatever stderr is now


def _show_library_notes() -> None:
    logger = logging.getLogger("npconvnext")
    if not any(isinstance(handler, _NotesOnStderr) for handler in logger.handlers):
        logger.addHandler(_NotesOnStderr())
    logger.setLevel(logging.INFO)


_RUNS_THE_MODEL = ("classify", "features", "evaluate", "golden", "parity", "finetune")


def _take_the_threads() -> None:
    """The command is the program, so it hands NumPy's BLAS thread count to npconvnext: a batch
    is then shared out image by image (engine/threads.py), which a library may not do unasked."""
    import numba

    from .engine.threads import set_num_threads

    set_num_threads(numba.get_num_threads())  # NPCONVNEXT_NUM_THREADS, if set, is already in it


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_notes()
    if args.command in _RUNS_THE_MODEL:
        _take_the_threads()
    try:
        args.run(args)
    # NpConvNeXtError is npconvnext's refusal of a bad input; plain ValueError and RuntimeError
    # are still raised for some (an unknown model name, an unreachable hub)
    except (CommandError, NpConvNeXtError, ValueError, RuntimeError, OSError) as exc:
        print(f"npconvnext {args.command}: error: {_shown(_describe(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"npconvnext {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
