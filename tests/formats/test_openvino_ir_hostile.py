"""Broken and hostile OpenVINO IRs get a CheckpointError naming the file and the problem, in
bounded time and memory: each is made from a small clean IR written by OpenVINO itself, with
one defect (issue #25's items 2 and 7 among them).
"""

import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import openvino as ov
import pytest
import timm
import torch

import npconvnext
import npconvnext.convert
from tests.formats.test_openvino_ir import randomise


@pytest.fixture(scope="module")
def small_ir(tmp_path_factory):
    net = randomise(timm.create_model("convnext_atto", pretrained=False, num_classes=3), 5)
    path = tmp_path_factory.mktemp("small") / "model.xml"
    ov.save_model(ov.convert_model(net, example_input=torch.zeros(1, 3, 32, 32)), path)  # FP16
    return path


@pytest.fixture(scope="module")
def small_ir_fp32(tmp_path_factory):
    net = randomise(timm.create_model("convnext_atto", pretrained=False, num_classes=3), 6)
    path = tmp_path_factory.mktemp("small32") / "model.xml"
    ov.save_model(ov.convert_model(net, example_input=torch.zeros(1, 3, 32, 32)), path, compress_to_fp16=False)
    return path


def _copy(ir, folder, name="model"):
    xml, bin_ = folder / f"{name}.xml", folder / f"{name}.bin"
    shutil.copy(ir, xml)
    shutil.copy(ir.with_suffix(".bin"), bin_)
    return xml, bin_


def _first_const(xml_text, element_type):
    root = ET.fromstring(xml_text)
    for layer in root.find("layers"):
        data = layer.find("data")
        if layer.get("type") == "Const" and data.get("element_type") == element_type and "," in data.get("shape"):
            return layer.get("id"), data
    raise AssertionError(element_type)


def _edit_const(xml, layer_id, **attrs):
    text = xml.read_text()
    pattern = re.compile(rf'(<layer id="{layer_id}"[^>]*>\s*<data )([^>]*)(/?>)')
    match = pattern.search(text)
    data = match.group(2)
    for key, value in attrs.items():
        data = re.sub(rf'{key}="[^"]*"', f'{key}="{value}"', data)
    xml.write_text(text[: match.start(2)] + data + text[match.end(2):])


def _not_a_convnext(folder):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    path = folder / "other.xml"
    ov.save_model(ov.convert_model(net, example_input=torch.zeros(1, 3, 32, 32)), path)
    return path


def _case(name, small_ir, folder):
    """(the path to load, what the error says) for each kind of broken IR."""
    if name == "not a ConvNeXt":
        return _not_a_convnext(folder), "ConvNeXt"
    xml, bin_ = _copy(small_ir, folder)
    text = xml.read_text()
    if name == "truncated bin":
        bin_.write_bytes(bin_.read_bytes()[: bin_.stat().st_size // 2])
        return xml, "truncated, or not this IR's weights"
    if name == "const outside the bin":
        layer_id, data = _first_const(text, "f16")
        _edit_const(xml, layer_id, offset=str(1 << 40))
        return xml, "truncated, or not this IR's weights"
    if name in ("fp16 inf", "fp16 nan"):
        layer_id, data = _first_const(text, "f16")
        raw = bytearray(bin_.read_bytes())
        offset = int(data.get("offset"))
        raw[offset: offset + 2] = np.array([np.inf if name == "fp16 inf" else np.nan], "<f2").tobytes()
        bin_.write_bytes(bytes(raw))
        return xml, "NaN or infinite"
    if name == "doctype":
        laughs = ('<!DOCTYPE net [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                  '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>')
        xml.write_text(text.replace("?>", "?>" + laughs, 1).replace('name="', 'name="&c;', 1))
        return xml, "DOCTYPE"
    if name == "external entity":
        xml.write_text(text.replace("?>", '?><!DOCTYPE net [<!ENTITY e SYSTEM "file:///etc/passwd">]>', 1))
        return xml, "DOCTYPE"
    if name == "missing bin":
        bin_.unlink()
        return xml, "no such file"
    if name == "huge dims":
        layer_id, data = _first_const(text, "f16")
        _edit_const(xml, layer_id, shape="4000000000, 4000000000")
        return xml, "cannot hold"
    if name == "not xml":
        xml.write_text(text[: len(text) // 2])
        return xml, "not well-formed"
    if name == "utf-16":
        xml.write_bytes(text.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>').encode())
        return xml, "encoding"
    return _graph_case(name, xml, text)


def _graph_case(name, xml, text):
    """Edits of the graph's layers and edges: (the path to load, what the error says)."""
    if name == "edge loop":
        loop = '<edge from-layer="0" from-port="0" to-layer="0" to-port="0"/>'
        xml.write_text(text.replace("</edges>", loop + "</edges>"))
        return xml, "not a ConvNeXt graph|two edges|expected|cycle"
    if name == "cycle":
        # a Transpose on the activation feeding itself through a spare input: the walk would loop
        root = ET.fromstring(text)
        node = next(l for l in root.find("layers") if l.get("type") in ("Transpose", "Add", "Multiply"))
        loop = (f'<edge from-layer="{node.get("id")}" from-port="{_output_port(node)}" '
                f'to-layer="{node.get("id")}" to-port="7"/>')
        xml.write_text(text.replace("</edges>", loop + "</edges>"))
        return xml, "cycle"
    if name == "constants re-read":
        bin_ = xml.with_suffix(".bin")
        # stray conversions of one constant's bytes, read again for each: many .bin's worth in all
        root = ET.fromstring(text)
        big = max((l.find("data") for l in root.find("layers") if l.get("type") == "Const"
                   and l.find("data").get("element_type") == "f16"), key=lambda d: int(d.get("size")))
        size, shape = int(big.get("size")), big.get("shape")
        copies = (2 * bin_.stat().st_size + (16 << 20)) // size + 2
        dims = "".join(f"<dim>{d.strip()}</dim>" for d in shape.split(","))
        layers = "".join(f'<layer id="{80000 + i}" name="r{i}" type="Const" version="opset1"><data element_type="f16" '
                         f'shape="{shape}" offset="{big.get("offset")}" size="{size}"/><output><port id="0" '
                         f'precision="FP16">{dims}</port></output></layer>'
                         f'<layer id="{90000 + i}" name="c{i}" type="Convert" version="opset1"><data destination_type='
                         f'"f32"/><input><port id="0">{dims}</port></input><output><port id="1" precision="FP32">'
                         f'{dims}</port></output></layer>' for i in range(copies))
        edges = "".join(f'<edge from-layer="{80000 + i}" from-port="0" to-layer="{90000 + i}" to-port="0"/>'
                        for i in range(copies))
        xml.write_text(text.replace("</layers>", layers + "</layers>").replace("</edges>", edges + "</edges>"))
        return xml, "reads? .* bytes"
    if name == "stray operation":
        # a dead-end ReLU on a block's input: the walk passes it by, and the final check sees it
        root = ET.fromstring(text)
        dw = next(l for l in root.find("layers") if l.get("type") == "GroupConvolution")
        edge = next(e for e in root.find("edges") if e.get("to-layer") == dw.get("id") and e.get("to-port") == "0")
        layer = ('<layer id="99999" name="stray" type="ReLU" version="opset1">'
                 '<input><port id="0" precision="FP32"><dim>1</dim></port></input>'
                 '<output><port id="1" precision="FP32"><dim>1</dim></port></output></layer>')
        xml.write_text(text.replace("</layers>", layer + "</layers>").replace(
            "</edges>", f'<edge from-layer="{edge.get("from-layer")}" from-port="{edge.get("from-port")}" '
                        'to-layer="99999" to-port="0"/></edges>'))
        return xml, "operations outside the network"
    raise AssertionError(name)


def _output_port(layer) -> str:
    return layer.find("output").find("port").get("id")


HOSTILE = ["not a ConvNeXt", "truncated bin", "const outside the bin", "fp16 inf", "fp16 nan", "doctype",
           "external entity", "missing bin", "huge dims", "not xml", "utf-16", "edge loop", "cycle",
           "constants re-read", "stray operation"]


@pytest.mark.parametrize("name", HOSTILE)
def test_broken_irs_name_the_file_and_the_problem(small_ir, tmp_path, name):
    path, problem = _case(name, small_ir, tmp_path)
    for load in (lambda: npconvnext.create_model(None, weights=path),
                 lambda: npconvnext.convert.convert(path, tmp_path / "out.safetensors")):
        with pytest.raises(npconvnext.CheckpointError, match=re.escape(str(path))) as caught:
            load()
        assert re.search(problem, str(caught.value)), str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_folding_that_would_grow_a_constant_is_refused(small_ir, tmp_path):
    """Two constants of 100000 values each, multiplied into the stem's LayerNorm weight, would
    broadcast to 10**10 values: refused before anything is allocated."""
    xml, _ = _copy(small_ir, tmp_path)
    text = xml.read_text()
    root = ET.fromstring(text)
    mvn = next(l for l in root.find("layers") if l.get("type") == "MVN")
    edges = root.find("edges")
    multiply = next(e.get("to-layer") for e in edges if e.get("from-layer") == mvn.get("id"))
    weight = next(e for e in edges if e.get("to-layer") == multiply and e.get("to-port") == "1")
    big = next(l.find("data") for l in root.find("layers") if l.get("type") == "Const"
               and l.find("data").get("element_type") == "f16" and int(l.find("data").get("size")) >= 200000)
    const = ('<layer id="{id}" name="c{id}" type="Const" version="opset1"><data element_type="f16" shape="{shape}" '
             f'offset="{big.get("offset")}" size="200000"/>'
             '<output><port id="0" precision="FP16">{dims}</port></output></layer>')
    layers = (const.format(id=90001, shape="1, 100000", dims="<dim>1</dim><dim>100000</dim>")
              + const.format(id=90002, shape="100000, 1", dims="<dim>100000</dim><dim>1</dim>")
              + '<layer id="90003" name="grow" type="Multiply" version="opset1">'
                '<input><port id="0"/><port id="1"/></input>'
                '<output><port id="2" precision="FP16"><dim>100000</dim><dim>100000</dim></port></output></layer>')
    old_edge = (f'<edge from-layer="{weight.get("from-layer")}" from-port="{weight.get("from-port")}" '
                f'to-layer="{multiply}" to-port="1"')
    assert old_edge in text
    text = text.replace(old_edge, f'<edge from-layer="90003" from-port="2" to-layer="{multiply}" to-port="1"')
    text = text.replace("</layers>", layers + "</layers>").replace("</edges>", (
        '<edge from-layer="90001" from-port="0" to-layer="90003" to-port="0"/>'
        '<edge from-layer="90002" from-port="0" to-layer="90003" to-port="1"/></edges>'))
    xml.write_text(text)
    with pytest.raises(npconvnext.CheckpointError, match=re.escape(str(xml)) + ".*refused"):
        npconvnext.load_state_dict(xml)


def test_an_integer_constant_where_a_weight_is_taken_is_refused(small_ir_fp32, tmp_path):
    """A float weight retyped to i32 (the same bytes) was read as integers and cast: the model
    loaded and its outputs moved (issue #25, item 7). OpenVINO refuses such an IR, and so does
    npconvnext, naming the layer and the type."""
    xml, _ = _copy(small_ir_fp32, tmp_path)
    npconvnext.load_state_dict(xml)
    layer_id, data = _first_const(xml.read_text(), "f32")
    _edit_const(xml, layer_id, element_type="i32")
    consumer = next(e.get("to-layer") for e in ET.fromstring(xml.read_text()).find("edges")
                    if e.get("from-layer") == layer_id)
    with pytest.raises(npconvnext.CheckpointError, match=re.escape(str(xml))) as caught:
        npconvnext.load_state_dict(xml)
    assert f"layer {consumer} " in str(caught.value) and "i32" in str(caught.value), str(caught.value)


def test_stray_foldings_count_against_the_read_budget(small_ir, tmp_path):
    """Stray Multiply(C, C) layers on the largest constant, outside the network: each folded
    result was kept, and only bytes read from the .bin were counted (issue #25, item 2). Made
    bytes count in the same budget as read ones, a few times the .bin's size."""
    xml, bin_ = _copy(small_ir, tmp_path)
    text = xml.read_text()
    root = ET.fromstring(text)
    big = max((l for l in root.find("layers") if l.get("type") == "Const"
               and l.find("data").get("element_type") == "f16"), key=lambda l: int(l.find("data").get("size")))
    size, dims = int(big.find("data").get("size")), "".join(
        f"<dim>{d.strip()}</dim>" for d in big.find("data").get("shape").split(","))
    copies = (4 * bin_.stat().st_size + (16 << 20)) // size + 8
    layers = "".join(f'<layer id="{90000 + i}" name="m{i}" type="Multiply" version="opset1"><input><port id="0">'
                     f'{dims}</port><port id="1">{dims}</port></input><output><port id="2" precision="FP16">{dims}'
                     '</port></output></layer>' for i in range(copies))
    edges = "".join(f'<edge from-layer="{big.get("id")}" from-port="{_output_port(big)}" to-layer="{90000 + i}" '
                    f'to-port="{port}"/>' for i in range(copies) for port in (0, 1))
    xml.write_text(text.replace("</layers>", layers + "</layers>").replace("</edges>", edges + "</edges>"))
    with pytest.raises(npconvnext.CheckpointError, match=re.escape(str(xml)) + ".*read and make \\d+ bytes"):
        npconvnext.load_state_dict(xml)


def test_mutated_irs_load_or_fail_cleanly(small_ir, tmp_path):
    """A seeded campaign of small mutations of a real IR (numbers in its attributes and dims,
    operation types, bytes, a shorter .bin): each loads or raises a CheckpointError naming the
    file, in bounded time."""
    import time
    from collections import Counter

    rng = np.random.default_rng(20261124)
    text, weights = small_ir.read_text(), small_ir.with_suffix(".bin").read_bytes()
    numbers = [m.span() for m in re.finditer(r"\d+", text)]
    types = [m.span(1) for m in re.finditer(r'type="(\w+)"', text)]
    values = ["0", "1", "3", "7", "65535", str(2**31), str(2**63), str(10**30), "-1", "?", "", "1.5", "x"]
    op_types = ["Const", "Add", "Multiply", "MVN", "Convolution", "GroupConvolution", "MatMul", "Gelu",
                "Transpose", "Result", "Parameter", "Concat", "Split", "Gather", "Subtract", "Unknown"]
    xml, bin_ = tmp_path / "m.xml", tmp_path / "m.bin"
    outcomes = Counter()
    for k in range(200):
        mutated, data = text, weights
        kind = k % 4
        if kind == 0:
            start, end = numbers[rng.integers(len(numbers))]
            mutated = text[:start] + values[rng.integers(len(values))] + text[end:]
        elif kind == 1:
            start, end = types[rng.integers(len(types))]
            mutated = text[:start] + op_types[rng.integers(len(op_types))] + text[end:]
        elif kind == 2:
            at = int(rng.integers(len(text)))
            mutated = text[:at] + chr(int(rng.integers(32, 127))) + text[at + 1:]
        else:
            data = weights[: int(rng.integers(len(weights)))]
        xml.write_text(mutated)
        bin_.write_bytes(data)
        start = time.perf_counter()
        try:
            npconvnext.load_state_dict(xml)
            outcomes["loaded"] += 1
        except npconvnext.CheckpointError as exc:
            assert str(xml) in str(exc), str(exc)
            outcomes["CheckpointError"] += 1
        assert time.perf_counter() - start < 5.0
    print(dict(outcomes))
    assert outcomes["loaded"] > 10 and outcomes["CheckpointError"] > 60  # both verdicts were reached
