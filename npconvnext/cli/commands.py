"""The commands of `npconvnext`, one function each taking the parsed arguments (parser.py)
and returning an exit status (EXIT_CODES); the work is done by the modules they call: batch.py
(classify, features), evaluate.py, benchmark.py, distributed/ (--scheduler, --output), oracle.py
(golden, parity), convert.py, summary.py, train/finetune.py, hub.py. Progress bars and notes go
through progress.py (tqdm), so a warning never lands inside a bar; results go to stdout.

A refusal here is a CommandError, which the command prints as one line (see __init__.py).
File names are printed with undecodable bytes as backslash escapes, so any name prints on any
terminal.
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from dataclasses import replace

import numpy as np

from .. import batch, progress
from ..atomic import atomic_write
from ..batch import DEFAULT_MODEL
from ..errors import NpConvNeXtError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = """exit status:
  0    done: every input was read
  1    failed (the error is the last line on stderr)
  2    usage error (a bad option or argument)
  3    done, but some images could not be read and were skipped (classify, features, evaluate:
       each is named in a warning, and in classify --json and --output in its row's "error")
  130  interrupted"""


class CommandError(Exception):
    """An error to print as one line on stderr with exit status 1."""


_shown = batch.shown  # a file name as printable text (see batch.shown)
_describe = batch.describe  # an error as the text a user needs


def _image_paths(inputs: list[str]) -> list[str]:
    return batch.list_images(inputs, keep_missing=True)  # a missing file is skipped as an unreadable one is


def _model_spec(args) -> batch.ModelSpec:
    return batch.ModelSpec(args.model, args.weights, dtype=getattr(args, "dtype", "float32"),
                           input_size=args.input_size)


def _load_model(args):
    """The model and the preprocessing that gives it its input (see batch.load_model)."""
    return batch.load_model(_model_spec(args))


def _read(paths, config, batch_size, args):
    """(chunk, paths read, their inputs, {path: failure}) per batch of paths, with a progress
    bar; an image that cannot be read or preprocessed, for whatever reason (a missing or bad
    file, an I/O error, too big for memory), is warned about and skipped."""
    with progress.bar(len(paths), args.command, quiet=args.quiet) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            good, x, failed = batch.read_batch(chunk, config)
            for reason in failed.values():
                progress.note(f"warning: skipped {reason}")
            yield chunk, good, x, failed
            bar.update(len(chunk))


def _batches(paths, config, args, skipped: dict):
    """(paths, inputs) of the images read, batch by batch; the skipped ones go into `skipped`."""
    for _, good, x, failed in _read(paths, config, args.batch_size, args):
        skipped.update(failed)
        if good:
            yield good, x


def _print(line: str) -> None:
    progress.write(line)  # stdout, above any progress bar


def cmd_classify(args):
    if args.scheduler or args.output:
        return _run_job(args, "classify")
    model, config = _load_model(args)
    classified = skipped = 0
    for chunk, good, x, failed in _read(_image_paths(args.inputs), config, args.batch_size, args):
        predictions = dict(zip(good, batch.classify(model, x, args.top_k) if good else []))
        skipped += len(failed)
        classified += len(good)
        for path in chunk:  # input order, the skipped ones too with --json
            if path in failed:
                if args.json:
                    _print(json.dumps({"file": _shown(path), "error": failed[path]}))
            elif args.json:
                _print(json.dumps(batch.classified_row(path, predictions[path])))
            else:
                prediction = predictions[path]
                _print(_shown(path) + "".join(f"\n  {p:7.2%}  {name} ({i})" for i, name, p in zip(
                    prediction.indices, prediction.names, prediction.probabilities)))
    if not classified:
        raise CommandError("none of the images could be read (see the warnings above)")
    return EXIT_SKIPPED if skipped else EXIT_OK


def _run_job(args, task: str) -> int:
    """classify/features --scheduler ... --output OUT: a partitioned, resumable job
    (npconvnext/distributed); classify --output without --scheduler runs it in this process."""
    from npconvnext.distributed import Job, run

    if not args.output:
        raise CommandError("--scheduler needs --output OUT, the directory the results go to")
    weights = os.path.abspath(args.weights) if args.weights else None  # the workers read it at this path
    job = Job(task, replace(_model_spec(args), weights=weights), top_k=getattr(args, "top_k", 5),
              batch_size=args.batch_size, partition_size=args.partition_size)
    paths = _image_paths(args.inputs)
    with progress.bar(len(paths), task, quiet=args.quiet) as bar:
        if args.scheduler:
            try:
                from npconvnext.distributed import cluster
            except ImportError as exc:
                raise CommandError(f"--scheduler needs Dask ({exc}): pip install -e \".[dask]\"") from None
            with cluster.connect(args.scheduler) as client:
                summary = run(client, paths, args.output, job, progress=progress.counter(bar),
                              threads=args.threads or "auto")
        else:
            summary = run(None, paths, args.output, job, progress=progress.counter(bar))
    print(f"{summary.images} images in {summary.partitions} partitions -> {_shown(summary.output)} "
          f"({summary.computed} run now, {summary.skipped} finished before); "
          f"{summary.failed} could not be read (their rows hold the error)")
    if summary.failed == summary.images:
        raise CommandError(f"none of the {summary.images} images could be read (see the errors in "
                           f"{_shown(summary.output)}/part-*.jsonl)")
    return EXIT_SKIPPED if summary.failed else EXIT_OK


def cmd_features(args):
    if args.scheduler:
        return _run_job(args, "features")
    model, config = _load_model(args)
    files, chunks, skipped = [], [], {}
    for paths, x in _batches(_image_paths(args.inputs), config, args, skipped):
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
    return EXIT_SKIPPED if skipped else EXIT_OK


def cmd_evaluate(args):
    from npconvnext import evaluate
    from npconvnext.labels import imagenet_classes

    model, config = _load_model(args)
    if not model.class_names and model.config.num_classes != 1000:
        raise CommandError(f"the model has {model.config.num_classes} classes and its weights name none: "
                           "evaluate needs class names (a file written by `npconvnext finetune` has them)")
    names = list(model.class_names or [c.wnid for c in imagenet_classes()])
    by_class = evaluate.class_folders(args.directory, model.class_names or None)
    if args.limit:
        by_class = evaluate.balanced_subset(by_class, args.limit, args.seed)
    truth = evaluate.ground_truth(by_class)
    skipped: dict = {}
    counts = evaluate.accuracy(model, _batches(list(truth), config, args, skipped), truth)
    if not counts.images:
        raise CommandError(f"{_shown(args.directory)}: none of the {len(truth)} images could be read "
                           "(see the warnings above)")
    report = counts.report(*batch.model_source(_model_spec(args), model), names)
    report["dtype"], report["skipped"] = model.dtype.name, sorted(map(_shown, skipped))
    print(evaluate.class_table(report))
    print(f"top-1 {report['top1']:.2f} %  top-5 {report['top5']:.2f} %  over {counts.images} images"
          + (f" ({len(skipped)} skipped)" if skipped else ""))
    if args.report:
        atomic_write(args.report, json.dumps(report, indent=2).encode())
    return EXIT_SKIPPED if skipped else EXIT_OK


def cmd_benchmark(args):
    import numba

    from npconvnext import benchmark
    from npconvnext.factory import create_model

    if args.random_weights and args.weights:
        raise CommandError("give --weights or --random-weights, not both")
    if args.random_weights:
        arch = (args.model or DEFAULT_MODEL).partition(".")[0]
        with warnings.catch_warnings():  # the note says it: random weights, for timing only
            warnings.simplefilter("ignore", UserWarning)
            model = create_model(arch, dtype=args.dtype, seed=0)
        name = f"{arch} (random weights: timing only)"
    elif args.weights:
        model, _ = _load_model(args)
        name = batch.model_source(_model_spec(args), model)[0]
    else:
        try:
            model, _ = _load_model(args)
        except NpConvNeXtError as exc:  # a tag that cannot be had (offline): timing needs no weights
            raise CommandError(f"{_describe(exc).rstrip('.')}. To time the architecture alone, without its weights: "
                               "--random-weights") from None
        name = batch.model_source(_model_spec(args), model)[0]
    size = (args.input_size, args.input_size) if args.input_size else None
    with progress.bar(args.seconds, "benchmark", unit="s", quiet=args.quiet) as bar:
        result = benchmark.run(model, name, args.batch_size, args.seconds, size, numba.get_num_threads(),
                               tick=lambda elapsed: bar.update(min(elapsed, args.seconds) - bar.n))
    print(json.dumps(result.as_dict()) if args.json else result.text())


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
    pretrained = args.pretrained or (tag if tag and not args.weights else None)  # with --weights, a tag only names
    if not (args.weights or pretrained or args.quiet):  # `--model convnext_tiny` alone is easily taken as pretrained
        progress.note(f"npconvnext: training {arch} from scratch (timm's init): no --weights or --pretrained given")
    with progress.bar(None, "finetune", unit="batch", quiet=args.quiet) as bar:

        def report(message):
            if message.startswith("epoch") and ": loss" in message:  # an epoch's summary: one line on stdout
                _print(message)
            else:  # a batch's: the bar's text
                bar.set_description_str(message, refresh=False)
                bar.update(1)

        def warn(message):
            progress.note(f"warning: {_shown(message)}")

        finetune(args.data_dir, args.output, arch or None, weights=args.weights, pretrained=pretrained,
                 recipe=recipe, val_dir=args.val_dir, resume=args.resume, progress=report, warn=warn)
    print(f"{args.output}: timm-named weights with the class names (checkpoint beside it)")


def cmd_summary(args):
    import npconvnext
    from npconvnext.summary import format_summary

    print(format_summary(npconvnext.get_config(args.model), (args.input_size, args.input_size)))


def cmd_download(args):
    from npconvnext.hub import copy_advice, download_weights

    path = download_weights(args.name)
    print(path)  # alone on stdout, for $(npconvnext download ...)
    if not args.quiet:
        print(copy_advice(path, args.name), file=sys.stderr)


def cmd_convert(args):
    from npconvnext.convert import convert

    meta = convert(args.src, args.dst, arch=args.arch, force=args.force, quiet=args.quiet)
    print(f"{_shown(args.dst)}: {meta['architecture']} from {meta['source_format']} "
          f"(source sha256 {meta['source_sha256']})")


def cmd_verify(args):
    from npconvnext.convert import verify

    meta = verify(args.converted, args.source, quiet=args.quiet)
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
    if args.plot:
        from npconvnext.explain_cli import draw_parity

        draw_parity(model, rows, tolerance, source, args.plot)
        print(f"{args.plot}: the errors in layer order")
    if not all(r.ok for r in rows):
        raise CommandError(f"parity failed: {sum(not r.ok for r in rows)} tensors past tolerance {tolerance:g}")
