"""The model families rankbias knows: names, sizes and which class builds each.

The registry of `rankbias.train.models` without torch, so that the planner (which Snakemake
imports on every parse) can parse and check model names. The modules themselves, and
everything derived from them (layers, shapes, costs), are in `rankbias.train.models`. Adding
a model is a class there and an entry in FAMILIES here.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Literal

ACTIVATIONS = ("relu", "leaky_relu")
LEAKY_SLOPE = 0.01          # the authors' LeakyReLU (torch's default slope)


class ModelError(ValueError):
    """A model cannot be built as asked; the message names the key and what fits."""


@dataclass(frozen=True)
class Family:
    """One architecture family: its spec `arch`, its name, how it is built.

    A family named with depth and width (MLP-BN-L-H) has `fixed = None`; a fixed
    model (VGG-16) names itself and carries its (depth, width) in `fixed`.
    """
    arch: str
    name: str
    module: str                         # its nn.Module class in rankbias.train.models
    images: bool                        # sees images (else flattened inputs)
    batchnorm: bool
    fixed: tuple[int, int] | None = None
    min_depth: int = 1
    options: tuple[tuple[str, bool], ...] = ()     # keyword arguments of the class


FAMILIES = {f.arch: f for f in (
    Family("mlp", "MLP", "MLP", images=False, batchnorm=False),
    Family("mlp_bn", "MLP-BN", "MLP", images=False, batchnorm=True, options=(("bn", True),)),
    Family("mlp_wn", "MLP-WN", "MLP", images=False, batchnorm=False, options=(("wn", True),)),
    Family("res", "RES", "ResidualMLP", images=False, batchnorm=False),
    Family("res_bn", "RES-BN", "ResidualMLP", images=False, batchnorm=True, options=(("bn", True),)),
    Family("conv", "CONV", "ConvNet", images=True, batchnorm=False, min_depth=0),
    Family("conv_bn", "CONV-BN", "ConvNet", images=True, batchnorm=True, min_depth=0,
           options=(("bn", True),)),
    Family("vgg16", "VGG-16", "VGG16", images=True, batchnorm=True, fixed=(16, 64)),
    Family("resnet18", "RESNET-18", "ResNet18", images=True, batchnorm=True, fixed=(18, 64)),
)}
ARCHS = tuple(FAMILIES)

_SIZED = re.compile(r"^(?P<family>[A-Z][A-Z0-9]*(?:-[A-Z]+)?)-(?P<depth>\d+)-(?P<width>\d+)$")


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ModelError(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
    return FAMILIES[arch]


def name_forms() -> str:
    """The accepted model names, for error messages."""
    return ", ".join(f.name if f.fixed else f"{f.name}-L-W" for f in FAMILIES.values())


def name_pattern() -> str:
    """A regular expression of the names parse_model_name accepts (in any case, spaces
    around allowed), in the dialect JSON schemas share with Python: the config schema's."""
    def anycase(name: str) -> str:
        return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)
    sized = "|".join(anycase(f.name) for f in FAMILIES.values() if not f.fixed)
    fixed = "|".join(anycase(f.name) for f in FAMILIES.values() if f.fixed)
    return rf"^\s*(({sized})-[0-9]+-[0-9]+|{fixed})\s*$"


def parse_model_name(name: str) -> tuple[str, int, int]:
    """'MLP-BN-10-100' -> ('mlp_bn', 10, 100); 'VGG-16' -> ('vgg16', 16, 64)."""
    text = str(name).strip().upper()
    for f in FAMILIES.values():
        if f.fixed and text == f.name:
            return f.arch, *f.fixed
    m = _SIZED.match(text)
    sized = next((f for f in FAMILIES.values() if m and not f.fixed and f.name == m["family"]), None)
    if m is None or sized is None:
        raise ModelError(f"model: {name!r} is not a model name; expected one of {name_forms()} "
                         "with integers L (depth) and W (width), e.g. MLP-BN-10-100 or CONV-BN-5-64")
    return sized.arch, int(m["depth"]), int(m["width"])


def model_name(arch: str, depth: int, width: int) -> str:
    """('mlp_bn', 10, 100) -> 'MLP-BN-10-100'."""
    f = family(arch)
    return f.name if f.fixed else f"{f.name}-{depth}-{width}"


def check_sizes(arch: str, depth: int, width: int) -> None:
    """Depth and width fit the family."""
    f = family(arch)
    if f.fixed:
        if (depth, width) != f.fixed:
            raise ModelError(f"depth, width: {f.name} has depth {f.fixed[0]} and width {f.fixed[1]}, "
                             f"got {depth} and {width} (give model: {f.name})")
        return
    if depth < f.min_depth:
        raise ModelError(f"depth: {f.name} needs depth >= {f.min_depth}, got {depth}")
    if width < 1:
        raise ModelError(f"width: must be >= 1, got {width}")


# -- each model's layer table, without torch ---------------------------------------------
# What the planner needs of a model before any job starts: the matrices whose spectra are
# stored (names, shapes, a convolution's input size), multiply-adds, parameters and the
# largest activation. Computed from the shapes alone, so that planning (Snakemake parses
# the workflow on every call and in every cluster job) never imports torch. Each class in
# rankbias.train.models has its table here; tests/test_models.py checks every family's table
# against a forward pass of the module itself on torch's meta device.

@dataclass(frozen=True)
class Layer:
    """A layer with a weight matrix, as the stored spectra name and shape it.

    kind: 'hidden' (Linear), 'conv' (a convolution; its matrix is the kernel
    reshaped [out, in*kh*kw]) or 'output' (the head). `input_size` is the spatial
    size (H, W) a convolution sees, for its operator's spectrum; `macs` the
    multiply-adds of one example through the layer.
    """
    name: str
    kind: str
    shape: tuple[int, int]          # the stored matrix, (out, in)
    input_size: tuple[int, int] | None
    macs: int


@dataclass(frozen=True)
class LayerTable:
    layers: tuple[Layer, ...]
    params: int                     # parameters of one member (BatchNorm's affine ones included)
    largest: int                    # the largest activation of one example (elements)


class _Table:
    """Accumulates a model's table while its shapes are walked, in module order."""

    def __init__(self, name: str, in_shape: tuple[int, ...], image_shape: tuple[int, ...]):
        self.name, self.image_shape = name, image_shape
        self.layers: list[Layer] = []
        self.params = 0
        self.largest = math.prod(in_shape) if len(in_shape) == 3 else 0   # the unflattened image

    def misfit(self, why: str) -> ModelError:
        return ModelError(f"model: {self.name} does not fit {'x'.join(map(str, self.image_shape))} "
                          f"inputs ({why})")

    def act(self, size: int) -> None:
        self.largest = max(self.largest, size)

    def linear(self, name: str, d_in: int, d_out: int, bias: bool, kind: str = "hidden",
               weight_norm: bool = False) -> int:
        self.layers.append(Layer(name, kind, (d_out, d_in), None, d_out * d_in))
        self.params += d_out * d_in + (d_out if bias else 0) + (1 if weight_norm else 0)
        self.act(d_out)
        return d_out

    def batchnorm(self, channels: int) -> None:
        self.params += 2 * channels

    def conv(self, name: str, c_in: int, c_out: int, hw: tuple[int, int], kernel: int, stride: int,
             padding: int, bias: bool) -> tuple[int, int]:
        out = tuple((s + 2 * padding - kernel) // stride + 1 for s in hw)
        if min(out) < 1:
            raise self.misfit(f"{name}, a {kernel}x{kernel} convolution with stride {stride}, "
                              f"gets a {hw[0]}x{hw[1]} image")
        positions = out[0] * out[1]
        self.layers.append(Layer(name, "conv", (c_out, c_in * kernel * kernel), (hw[0], hw[1]),
                                 c_out * c_in * kernel * kernel * positions))
        self.params += c_out * c_in * kernel * kernel + (c_out if bias else 0)
        self.act(c_out * positions)
        return out[0], out[1]

    def pool(self, channels: int, hw: tuple[int, int]) -> tuple[int, int]:
        out = (hw[0] // 2, hw[1] // 2)
        if min(out) < 1:
            raise self.misfit(f"a 2x2 max-pool gets a {hw[0]}x{hw[1]} image")
        self.act(channels * out[0] * out[1])
        return out

    def head(self, features: int, expected: int, num_classes: int, bias: bool) -> None:
        if features != expected:
            raise self.misfit(f"its head takes {expected} features, the last layer gives {features}")
        self.linear("out", features, num_classes, bias, kind="output")


def _mlp(t: _Table, f: Family, depth, width, bias, shape, classes) -> None:
    d = math.prod(shape)
    bn, wn = dict(f.options).get("bn", False), dict(f.options).get("wn", False)
    for i in range(1, depth + 1):
        t.linear(f"fc{i}", d if i == 1 else width, width, bias, weight_norm=wn)
        if bn:
            t.batchnorm(width)
    t.linear("out", width, classes, bias, kind="output")


def _residual(t: _Table, f: Family, depth, width, bias, shape, classes) -> None:
    bn = dict(f.options).get("bn", False)
    t.linear("stem", math.prod(shape), width, bias)
    if bn:
        t.batchnorm(width)
    for i in range(1, depth + 1):
        for w in ("w1", "w2"):
            t.linear(f"block{i}.{w}", width, width, bias)
            if bn:
                t.batchnorm(width)
    t.linear("out", width, classes, bias, kind="output")


class _Features:
    """Numbers the entries of a `features` nn.Sequential as models.py builds them."""

    def __init__(self):
        self.index = 0

    def take(self, n: int = 1) -> str:
        name = f"features.{self.index}"
        self.index += n
        return name


def _convnet(t: _Table, f: Family, depth, width, bias, shape, classes) -> None:
    bn = dict(f.options).get("bn", False)
    c, hw = shape[0], (shape[1], shape[2])
    seq = _Features()
    for i, (k, s, p, act) in enumerate([(2, 2, 0, False), (2, 2, 0, True)] + [(3, 1, 1, True)] * depth):
        hw = t.conv(seq.take(1 + bn + act), c if i == 0 else width, width, hw, k, s, p, bias)
        if bn:
            t.batchnorm(width)
    t.head(width * hw[0] * hw[1], width * (shape[1] // 4) * (shape[2] // 4), classes, bias)


VGG16_LAYERS: tuple[int | Literal["M"], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16(t: _Table, f: Family, depth, width, bias, shape, classes) -> None:
    c, hw = shape[0], (shape[1], shape[2])
    seq = _Features()
    for v in VGG16_LAYERS:
        if v == "M":
            seq.take()
            hw = t.pool(c, hw)
        else:
            hw = t.conv(seq.take(3), c, int(v), hw, 3, 1, 1, bias)
            t.batchnorm(int(v))
            c = int(v)
    t.head(c * hw[0] * hw[1], c, classes, bias)


def _resnet18(t: _Table, f: Family, depth, width, bias, shape, classes) -> None:
    hw = t.conv("features.0", shape[0], 64, (shape[1], shape[2]), 3, 1, 1, False)
    t.batchnorm(64)
    c, block = 64, 3
    for i, w in enumerate((64, 128, 256, 512)):
        for j in range(2):
            stride, name = (2 if i > 0 and j == 0 else 1), f"features.{block}"
            out = t.conv(f"{name}.conv1", c, w, hw, 3, stride, 1, False)
            t.batchnorm(w)
            t.conv(f"{name}.conv2", w, w, out, 3, 1, 1, False)
            t.batchnorm(w)
            if stride != 1 or c != w:
                t.conv(f"{name}.shortcut.0", c, w, hw, 1, stride, 0, False)
                t.batchnorm(w)
            hw, c, block = out, w, block + 1
    t.head(c, 512, classes, bias)     # global average pooling


_TABLES = {"MLP": _mlp, "ResidualMLP": _residual, "ConvNet": _convnet, "VGG16": _vgg16, "ResNet18": _resnet18}


def input_shape(arch: str, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """What a family's model sees of images `image_shape` (C, H, W): the images, or
    their features flattened."""
    return tuple(image_shape) if family(arch).images else (math.prod(image_shape),)


@functools.lru_cache(maxsize=256)
def layers(arch: str, depth: int, width: int, bias: bool, image_shape: tuple[int, int, int],
           num_classes: int) -> LayerTable:
    """The layer table of a family's model on images of `image_shape` (C, H, W). A model
    that does not fit its input fails here, before any job starts."""
    check_sizes(arch, depth, width)
    f = family(arch)
    shape = input_shape(arch, image_shape)
    t = _Table(model_name(arch, depth, width), shape, tuple(image_shape))
    _TABLES[f.module](t, f, depth, width, bias, shape, num_classes)
    return LayerTable(tuple(t.layers), t.params, t.largest)
