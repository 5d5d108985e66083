"""docs/walkthrough.md cannot drift: every code reference resolves, every shape is the trace's."""

import importlib
import os
import re
import warnings

import numpy as np

import npconvnext

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "walkthrough.md")


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_code_references_resolve():
    text = open(DOC).read()
    refs = set(re.findall(r"`(npconvnext\.[\w.]+)`", text))
    assert len(refs) >= 15
    for ref in refs:
        assert resolve(ref) is not None, ref
    fields = re.findall(r"fields `(\w+)`, `(\w+)`", text)
    for field in fields[0]:
        assert field in npconvnext.ConvNeXtConfig.__dataclass_fields__


def test_shapes_are_convnext_tiny_at_224():
    text = open(DOC).read()
    rows = re.findall(r"\| `([\w.]+)` \| (\([\d, ]+\)) \|", text)
    assert len(rows) >= 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = npconvnext.create_model("convnext_tiny")
    trace = model.trace(np.zeros((1, 3, 224, 224), np.float32))
    for name, shape in rows:
        assert trace[name].shape == eval(shape), name
