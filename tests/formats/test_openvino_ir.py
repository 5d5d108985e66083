"""OpenVINO IRs (.xml + .bin), written by OpenVINO itself from re-randomised timm models along
the paths real IRs are made, give OpenVINO's own outputs in npconvnext, with no OpenVINO
imported by it.

The paths (what each leaves in the IR is in npconvnext/formats/openvino_ir/):
    plain      openvino.convert_model(timm model) -> save_model, FP32 and FP16-compressed
    neutral    the same with zero biases and unit norm scales and layer scales, which OpenVINO drops
    omz        the Open Model Zoo's: torch.onnx.export -> convert_model -> PrePostProcessor
               (reverse the input channels, mean, scale: BGR 0-255 in) + SoftMax -> save_model,
               FP32 and FP16 (save_model folds the reversal and the scale into the stem)
    omz-nhwc   the same with an NHWC input tensor (the scale then stays a Multiply)
    explicit   the reversal, mean and scale as separate operations (ov.serialize, no folding)
    folded     everything folded into the stem by hand: the file cannot tell its input

Broken and hostile IRs are in test_openvino_ir_hostile.py.

OpenVINO's CPU plugin may run f32 models in bf16 on CPUs with AMX; every comparison compiles
with INFERENCE_PRECISION_HINT f32, so both sides compute in float32 from the same weights.
"""

import shutil

import numpy as np
import openvino as ov
import pytest
import timm
import torch
from openvino.preprocess import PrePostProcessor

import npconvnext
import npconvnext.convert
from npconvnext.convention import Convention
from npconvnext.formats.openvino_ir import IMAGENET_MEAN_255, IMAGENET_STD_255

SIZE = 64
OMZ = Convention(channel_order="BGR", scale="255", mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255,
                 outputs="probabilities", source="the caller")


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter off its init: layer scale 0.1-1 (not 1e-6), norm scales around 1, biases
    and GRN a few tenths, weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.1, 1.0, generator=g)
            elif p.ndim == 1 and name.endswith("weight") and "grn" not in name:
                p.uniform_(0.5, 1.5, generator=g)
            elif p.ndim == 1:
                p.normal_(0.0, 0.2, generator=g)
            else:
                p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()), generator=g)
    return model.eval()


def openvino_outputs(path, x: np.ndarray) -> np.ndarray:
    """OpenVINO's CPU inference of the IR at `path`, in float32 (see the module docstring)."""
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[0]


def with_preprocessing(model: ov.Model, layout: str = "NCHW") -> ov.Model:
    """The Open Model Zoo's additions: BGR 0-255 in (reversed channels, mean, scale), probs out."""
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_layout(ov.Layout(layout))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().reverse_channels().mean(list(IMAGENET_MEAN_255)).scale(list(IMAGENET_STD_255))
    model = ppp.build()
    logits = model.get_results()[0].input_value(0)
    probs = ov.opset13.softmax(logits, 1)
    return ov.Model([ov.opset13.result(probs)], model.get_parameters(), "convnext")


def explicit_preprocessing(model: ov.Model, reversal: str = "gather") -> ov.Model:
    """The reversal (a Gather, or a Split and a Concat), the mean (Subtract) and the scale
    (Divide) as separate operations before the network's own input."""
    ops = ov.opset13
    param = model.get_parameters()[0]
    x = ops.parameter([-1, 3, -1, -1], np.float32, name="image")
    if reversal == "gather":
        bgr = ops.gather(x, ops.constant(np.array([2, 1, 0], np.int64)), ops.constant(np.int64(1)))
    else:
        b, g, r = ops.split(x, ops.constant(np.int64(1)), 3).outputs()
        bgr = ops.concat([r, g, b], 1)
    mean = ops.constant(np.array(IMAGENET_MEAN_255, np.float32).reshape(1, 3, 1, 1))
    std = ops.constant(np.array(IMAGENET_STD_255, np.float32).reshape(1, 3, 1, 1))
    normalised = ops.divide(ops.subtract(bgr, mean), std)
    for target in list(param.output(0).get_target_inputs()):
        target.replace_source_output(normalised.output(0))
    return ov.Model(model.get_results(), [x], "convnext")


def fold_into_stem(net: torch.nn.Module) -> None:
    """The OMZ preprocessing folded into timm's stem by hand, in place: the network then takes
    BGR 0-255 pixels, and nothing in its IR says so."""
    conv = net.stem[0]
    mean = torch.tensor(IMAGENET_MEAN_255, dtype=torch.float64)
    std = torch.tensor(IMAGENET_STD_255, dtype=torch.float64)
    with torch.no_grad():
        w = conv.weight.double()                                         # (O, 3, 4, 4), RGB
        bias = conv.bias.double() - (w * (mean / std)[None, :, None, None]).sum((1, 2, 3))
        conv.weight.copy_((w / std[None, :, None, None]).flip(1).float())  # BGR, raw pixels
        conv.bias.copy_(bias.float())


ARCHS = {"convnext_atto": 0, "convnextv2_atto": 1, "convnext_tiny": 2, "convnextv2_tiny": 3}  # conv MLP, + GRN;
# linear MLP, + GRN on channels last
EVERY_PATH = "convnext_atto"  # the paths beyond plain and omz are built for this one only
_BUILT = {}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """arch -> (arch, the re-randomised timm model, every path's IR of it), built once."""
    def get(arch):
        if arch not in _BUILT:
            _BUILT[arch] = _build(arch, tmp_path_factory)
        return _BUILT[arch]
    yield get
    for _, _, files in _BUILT.values():  # each arch's IRs take hundreds of megabytes
        shutil.rmtree(next(iter(files.values())).parent)
    _BUILT.clear()


@pytest.fixture(scope="module", params=list(ARCHS))
def irs(request, build):
    return build(request.param)


def _build(arch, tmp_path_factory):
    net = randomise(timm.create_model(arch, pretrained=False, num_classes=7), ARCHS[arch])
    folder = tmp_path_factory.mktemp(arch)
    example = torch.zeros(1, 3, SIZE, SIZE)
    plain = ov.convert_model(net, example_input=example)
    files = {"plain": folder / "plain.xml", "plain-fp16": folder / "plain-fp16.xml"}
    ov.save_model(plain, files["plain"], compress_to_fp16=False)
    ov.save_model(plain, files["plain-fp16"])
    onnx_path = folder / "model.onnx"
    torch.onnx.export(net, (example,), onnx_path, input_names=["input"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}})
    files["omz"], files["omz-fp16"] = folder / "omz.xml", folder / "omz-fp16.xml"
    ov.save_model(with_preprocessing(ov.convert_model(onnx_path)), files["omz"], compress_to_fp16=False)
    ov.save_model(with_preprocessing(ov.convert_model(onnx_path)), files["omz-fp16"])
    if arch == EVERY_PATH:
        files["omz-nhwc"] = folder / "omz-nhwc.xml"
        ov.save_model(with_preprocessing(ov.convert_model(onnx_path), "NHWC"), files["omz-nhwc"],
                      compress_to_fp16=False)
        files["explicit"] = folder / "explicit.xml"
        ov.serialize(explicit_preprocessing(ov.convert_model(onnx_path)), files["explicit"])
        files["explicit-split"] = folder / "explicit-split.xml"
        ov.serialize(explicit_preprocessing(ov.convert_model(onnx_path), "split"), files["explicit-split"])
        folded = randomise(timm.create_model(arch, pretrained=False, num_classes=7), ARCHS[arch])
        fold_into_stem(folded)
        neutral = randomise(timm.create_model(arch, pretrained=False, num_classes=7), ARCHS[arch])
        with torch.no_grad():  # OpenVINO drops an Add of zeros and a Multiply by ones: none are left
            for name, p in neutral.named_parameters():
                if p.ndim == 1:
                    scales = ("gamma", "norm.weight", "stem.1.weight", "downsample.0.weight")
                    p.fill_(1.0 if name.endswith(scales) else 0.0)
        files["neutral"] = folder / "neutral.xml"
        ov.save_model(ov.convert_model(neutral, example_input=example), files["neutral"], compress_to_fp16=False)
        files["folded"] = folder / "folded.xml"
        ov.save_model(ov.convert_model(folded, example_input=example), files["folded"], compress_to_fp16=False)
    return arch, net, files


def inputs(kind: str, seed: int = 0) -> np.ndarray:
    """What the IR of each path takes: normalised RGB (plain), BGR 0-255 (the others)."""
    rng = np.random.default_rng(seed)
    if kind.startswith("plain") or kind == "neutral":
        return rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    x = rng.uniform(0, 255, (2, 3, SIZE, SIZE)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if kind.endswith("nhwc") else x


EXPECTED = {  # path -> (layout, channel order, normalises inside, outputs)
    "plain": ("NCHW", "RGB", False, "logits"), "plain-fp16": ("NCHW", "RGB", False, "logits"),
    "omz": ("NCHW", "BGR", True, "probabilities"), "omz-fp16": ("NCHW", "BGR", True, "probabilities"),
    "omz-nhwc": ("NHWC", "BGR", True, "probabilities"), "explicit": ("NCHW", "BGR", True, "logits"),
    "explicit-split": ("NCHW", "BGR", True, "logits"),
    "folded": ("NCHW", "RGB", False, "logits"), "neutral": ("NCHW", "RGB", False, "logits"),
}


CASES = [(arch, kind) for arch in ARCHS for kind in EXPECTED
         if arch == EVERY_PATH or kind in ("plain", "plain-fp16", "omz", "omz-fp16")]


@pytest.mark.parametrize("arch, kind", CASES)
def test_npconvnext_gives_openvinos_outputs(build, arch, kind):
    arch, _, files = build(arch)
    path = files[kind]
    model = npconvnext.create_model(None, weights=path, dtype="float64", backend="numpy")
    assert model.config.name == arch and model.config.num_classes == 7
    conv = model.convention
    assert (conv.layout, conv.channel_order, conv.normalises_inside, conv.outputs) == EXPECTED[kind]
    assert "openvino-ir" in model.describe() and conv.source in model.describe()
    x = inputs(kind)
    expected = openvino_outputs(path, x)
    actual = model(x)
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    print(f"{arch} {kind}: max relative error {error:.2e} ({conv.outputs}; convention of {conv.source})")
    assert error <= 1e-4
    if kind.endswith("fp16"):
        # the FP16 IR's weights are the FP32 ones rounded to half precision (relative 2**-11 at
        # most); state what that rounding does to the outputs, against the FP32 IR
        full_path = files[kind[: -len("-fp16")]]
        full = openvino_outputs(full_path, x)
        rounding = _worst_rounding(npconvnext.load_state_dict(path), npconvnext.load_state_dict(full_path))
        print(f"  FP16 weights vs FP32: rounded by at most {rounding:.2e} relative (normal half-precision range); "
              f"outputs differ by {np.abs(expected - full).max() / np.abs(full).max():.2e}")
        assert rounding <= 2.0**-11 * 1.01  # round to nearest in half precision, and nothing else


def _worst_rounding(half: dict, full: dict) -> float:
    """The largest relative change from the FP32 IR's weights to the FP16 IR's, over the values
    half precision holds as normal numbers (below 2**-14 it keeps fewer bits); the stem is left
    out, being unfolded from other constants in each."""
    worst = 0.0
    for name, reference in full.items():
        if name.startswith("stem.0"):
            continue
        normal = np.abs(reference) >= 2.0**-14
        if normal.any():
            change = np.abs(half[name][normal].astype(np.float64) - reference[normal]) / np.abs(reference[normal])
            worst = max(worst, float(change.max()))
    return worst


def test_the_stem_comes_back_as_timms(irs):
    """The OMZ IR's folded reversal and scale are unfolded: every weight is timm's, to float32
    rounding, and the converted file gives timm's logits on timm-style input."""
    arch, net, files = irs
    reference = {k: v.numpy() for k, v in net.state_dict().items()}
    state = npconvnext.load_state_dict(files["omz"])
    assert state.keys() == reference.keys()
    for name, array in state.items():
        if name.endswith((".gamma", "mlp.fc2.weight", "mlp.fc2.bias")) and arch.startswith("convnext_"):
            continue  # save_model folds gamma into fc2 where no Transpose is between: compared below
        np.testing.assert_allclose(array, reference[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for block in {n.rsplit(".", 1)[0] for n in state if n.endswith(".gamma")}:
        for part in ("weight", "bias"):
            np.testing.assert_allclose(_layer_scaled(state, block, part), _layer_scaled(reference, block, part),
                                       rtol=1e-4, atol=1e-5, err_msg=block)


def _layer_scaled(state, block, part):
    """gamma * fc2's weight or bias: what a block adds to its input, wherever gamma is kept."""
    fc2 = state[f"{block}.mlp.fc2.{part}"]
    return state[f"{block}.gamma"].reshape(-1, *[1] * (fc2.ndim - 1)) * fc2


def test_converted_ir_is_timms_network(irs, tmp_path):
    arch, net, files = irs
    out = tmp_path / "converted.safetensors"
    metadata = npconvnext.convert.convert(files["omz-fp16" if arch == "convnext_tiny" else "omz"], out)
    assert metadata["architecture"] == arch and metadata["source_format"].startswith("openvino-ir")
    timm_net = timm.create_model(arch, pretrained=True, num_classes=7,
                                 pretrained_cfg_overlay=dict(file=str(out), num_classes=7)).eval()
    x = torch.from_numpy(inputs("plain"))
    with torch.no_grad():
        expected, actual = net(x).numpy(), timm_net(x).numpy()
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    print(f"{arch}: converted IR vs the timm model it came from: {error:.2e}")
    assert error <= (5e-3 if arch == "convnext_tiny" else 1e-4)  # tiny's from the FP16 IR: rounded weights


def test_a_folded_ir_takes_the_callers_convention(build, tmp_path):
    arch, _, files = build(EVERY_PATH)
    path = files["folded"]
    x = inputs("folded")
    expected = openvino_outputs(path, x)
    assumed = npconvnext.create_model(None, weights=path, dtype="float64", backend="numpy")
    assert not assumed.convention.normalises_inside and "convention_override" in assumed.convention.source
    told = npconvnext.create_model(None, weights=path, dtype="float64", backend="numpy",
                                   convention_override=replace_outputs(OMZ, "logits"))
    assert told.convention.source == "the caller" and told.data_config.channel_order == "BGR"
    assert told.data_config.scale == "255" and "the caller" in told.describe()
    for model in (assumed, told):  # the same numbers either way: the override re-expresses the stem
        assert np.abs(model(x) - expected).max() <= 1e-4 * np.abs(expected).max()
    # converted for that convention, the file is timm's network again, for normalised RGB input
    out = tmp_path / "unfolded.safetensors"
    npconvnext.convert.convert(path, out, convention=replace_outputs(OMZ, "logits"))
    npconvnext.convert.verify(out, path)  # converted again for the convention recorded in the file
    timm_net = timm.create_model(arch, pretrained=True, num_classes=7,
                                 pretrained_cfg_overlay=dict(file=str(out), num_classes=7)).eval()
    rgb = (x[:, ::-1] - np.float32(IMAGENET_MEAN_255)[:, None, None]) / np.float32(IMAGENET_STD_255)[:, None, None]
    with torch.no_grad():
        actual = timm_net(torch.from_numpy(np.ascontiguousarray(rgb, np.float32))).numpy()
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def replace_outputs(convention, outputs):
    from dataclasses import replace

    return replace(convention, outputs=outputs)


def test_the_bin_loads_as_its_xml(build):
    _, _, files = build(EVERY_PATH)
    path = files["plain"]
    from_bin = npconvnext.load_state_dict(path.with_suffix(".bin"))
    from_xml = npconvnext.load_state_dict(path)
    assert from_bin.keys() == from_xml.keys() and all(np.array_equal(from_bin[k], from_xml[k]) for k in from_xml)


def test_the_command_classifies_with_an_ir(build, tmp_path):
    import json
    import subprocess
    import sys

    from PIL import Image

    _, _, files = build(EVERY_PATH)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(image)
    out = subprocess.run([sys.executable, "-m", "npconvnext", "classify", str(image), "--weights",
                          str(files["omz"]), "--json", "--top-k", "3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    model = npconvnext.create_model(None, weights=files["omz"])
    x = npconvnext.preprocess(str(image), model.data_config)[None]   # BGR 0-255, as the IR takes
    probs = openvino_outputs(files["omz"], x)[0]
    assert line["indices"] == [int(i) for i in np.argsort(-probs)[:3]]
    np.testing.assert_allclose(line["probabilities"], np.sort(probs)[::-1][:3], atol=1e-4)
    converted = tmp_path / "converted.safetensors"
    for command in (["convert", files["omz"], converted], ["verify", converted, files["omz"]]):
        out = subprocess.run([sys.executable, "-m", "npconvnext", *map(str, command)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_tensorflow_stays_out_of_this_process():
    """OpenVINO and TensorFlow crash when both are loaded in one process (other tests run
    TensorFlow in subprocesses): nothing here may bring it in."""
    import sys

    assert "tensorflow" not in sys.modules
