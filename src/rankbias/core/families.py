"""The model families rankbias knows: names, sizes and each one's architecture, declared once.

Every architecture is a torch-free declaration here (`Part`: its modules, their shapes,
and the order its forward calls them). From it come both the layer table the planner
reads (`layers`: matrices, shapes, costs; Snakemake imports this module on every parse,
so no torch) and the `nn.Module` the trainers run (`rankbias.train.models.build` walks
the same declaration). Adding a model is a declaring function and an entry in FAMILIES,
both here (docs/add-a-model.md).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Literal

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
    declare: Callable[..., Part]        # (depth, width, bias, image_shape, num_classes, **options) -> Part
    images: bool                        # sees images (else flattened inputs)
    batchnorm: bool
    fixed: tuple[int, int] | None = None
    min_depth: int = 1
    options: tuple[tuple[str, bool], ...] = ()     # keyword arguments of `declare`



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


# -- each model, declared once ---------------------------------------------------------
# A network is a tree of Parts. A leaf is one torch layer; a 'dict' or 'seq' groups
# parts (nn.ModuleDict, nn.Sequential) and has no forward of its own; a 'block' runs a
# program over its parts: the parts named in `body` in turn, then (if `shortcut` is not
# None) a residual sum with the parts named in `shortcut` applied to the block's input
# (empty: the input itself), then those in `after`. Parts are created in the order
# declared, which fixes the parameters' names, their order and the seed's draws.

@dataclass(frozen=True)
class Part:
    """One module of a declared network.

    kind and args: 'linear' (in, out, bias, weight_norm), 'conv' (in, out, kernel, stride,
    padding, bias), 'bn1d' / 'bn2d' (channels), 'identity', 'act' (the run's activation),
    'maxpool' (2x2, stride 2), 'avgpool' (global), 'unflatten' ((C, H, W)), 'flatten';
    'dict', 'seq' and 'block' have `children` (name, Part); a block runs `body`,
    `shortcut` and `after` (paths of its parts, '.' between levels); `input_first`: the
    residual sum is input + body (else body + shortcut(input)).
    """
    kind: str
    args: tuple = ()
    children: tuple[tuple[str, "Part"], ...] = ()
    body: tuple[str, ...] = ()
    shortcut: tuple[str, ...] | None = None
    after: tuple[str, ...] = ()
    input_first: bool = True

    def walk(self, prefix: str = ""):
        """(path, part) of this part and all below it, in the order they are created."""
        yield prefix, self
        for name, child in self.children:
            yield from child.walk(f"{prefix}.{name}" if prefix else name)

    @functools.cached_property
    def named(self) -> dict[str, "Part"]:
        """The children by name, built once (a deep network looks up each call by name)."""
        return dict(self.children)

    def part(self, path: str) -> "Part":
        node = self
        for name in path.split("."):
            node = node.named[name]
        return node


ACT = Part("act")


def linear(d_in: int, d_out: int, bias: bool, weight_norm: bool = False) -> Part:
    return Part("linear", (d_in, d_out, bias, weight_norm))


def conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int, bias: bool) -> Part:
    return Part("conv", (c_in, c_out, kernel, stride, padding, bias))


def norm(channels: int, on: bool, image: bool = False) -> Part:
    """BatchNorm where the family has it, else an Identity in its place."""
    return Part("bn2d" if image else "bn1d", (channels,)) if on else Part("identity")


def group(*children: tuple[str, Part]) -> Part:
    return Part("dict", children=tuple(children))


def seq(*parts: Part) -> Part:
    return Part("seq", children=tuple((str(i), p) for i, p in enumerate(parts)))


def image_net(image_shape: tuple[int, ...], features: Part, head: Part) -> Part:
    """image -> features -> flatten -> out: a network that sees images (its inputs
    arrive flattened; the engine finds the image part between Unflatten and Flatten)."""
    return Part("block", children=(("image", Part("unflatten", (tuple(image_shape),))), ("features", features),
                                   ("flatten", Part("flatten")), ("out", head)),
                body=("image", "features", "flatten", "out"))


def _mlp(depth: int, width: int, bias: bool, shape: tuple[int, int, int], classes: int,
         bn: bool = False, wn: bool = False) -> Part:
    """MLP-L-H (and -BN, -WN): L hidden Linear layers of width H, each followed by
    BatchNorm (-BN) and the activation; -WN normalises each hidden weight
    (W = g V / ||V||_F, one scalar g per matrix, as the authors' `mlp_wn`)."""
    hidden: list[tuple[str, Part]] = []
    for i in range(1, depth + 1):
        hidden += [(f"fc{i}", linear(math.prod(shape) if i == 1 else width, width, bias, wn)),
                   (f"bn{i}", norm(width, bn))]
    calls = [c for i in range(1, depth + 1) for c in (f"hidden.fc{i}", f"hidden.bn{i}", "act")]
    return Part("block", children=(("hidden", group(*hidden)), ("act", ACT), ("out", linear(width, classes, bias))),
                body=(*calls, "out"))


def _residual(depth: int, width: int, bias: bool, shape: tuple[int, int, int], classes: int,
              bn: bool = False) -> Part:
    """RES-L-H (and -BN): a Linear stem (with BN, no activation), L residual blocks
    x -> x + act(bn2(w2 act(bn1(w1 x)))) (the paper's; BN optional), a linear head."""
    block = Part("block", children=(("w1", linear(width, width, bias)), ("bn1", norm(width, bn)),
                                    ("w2", linear(width, width, bias)), ("bn2", norm(width, bn)), ("act", ACT)),
                 body=("w1", "bn1", "act", "w2", "bn2", "act"), shortcut=())
    blocks = group(*((f"block{i}", block) for i in range(1, depth + 1)))
    return Part("block", children=(("stem", linear(math.prod(shape), width, bias)), ("stem_bn", norm(width, bn)),
                                   ("blocks", blocks), ("out", linear(width, classes, bias))),
                body=("stem", "stem_bn", *(f"blocks.block{i}" for i in range(1, depth + 1)), "out"))


def conv_bn_act(c_in: int, c_out: int, bias: bool, bn: bool, kernel: int = 3, stride: int = 1,
                padding: int = 1, act: bool = True) -> list[Part]:
    return [conv(c_in, c_out, kernel, stride, padding, bias)] + [norm(c_out, True, True)] * bn + [ACT] * act


def _convnet(depth: int, width: int, bias: bool, shape: tuple[int, int, int], classes: int,
             bn: bool = False) -> Part:
    """CONV-L-W (and -BN), the authors' ConvNet: two stride-2 2x2 convolutions to
    width W (the second followed by the activation), L 3x3 same-padding convolutions
    with the activation, BatchNorm after every convolution in -BN, a linear head."""
    layers = (conv_bn_act(shape[0], width, bias, bn, 2, 2, 0, act=False) + conv_bn_act(width, width, bias, bn, 2, 2, 0)
              + [p for _ in range(depth) for p in conv_bn_act(width, width, bias, bn)])
    return image_net(shape, seq(*layers), linear(width * (shape[1] // 4) * (shape[2] // 4), classes, bias))


VGG16_LAYERS: tuple[int | Literal["M"], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16(depth: int, width: int, bias: bool, shape: tuple[int, int, int], classes: int) -> Part:
    """VGG-16 with the authors' CIFAR configuration: 3x3 conv-BN-activation layers
    and 2x2 max-pools (VGG16_LAYERS), then a 512 -> classes linear head."""
    layers, c = [], shape[0]
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(Part("maxpool"))
        else:
            layers += conv_bn_act(c, v, bias, bn=True)
            c = v
    return image_net(shape, seq(*layers), linear(c, classes, bias))


def _basic_block(c_in: int, c_out: int, stride: int) -> Part:
    """ResNet's two 3x3 conv-BN layers plus a shortcut (a 1x1 conv-BN where the shape
    changes), the activation after the sum. Its convolutions carry no bias: BatchNorm
    follows each."""
    shortcut = (seq(conv(c_in, c_out, 1, stride, 0, False), norm(c_out, True, True))
                if stride != 1 or c_in != c_out else seq())
    return Part("block", children=(("conv1", conv(c_in, c_out, 3, stride, 1, False)), ("bn1", norm(c_out, True, True)),
                                   ("conv2", conv(c_out, c_out, 3, 1, 1, False)), ("bn2", norm(c_out, True, True)),
                                   ("shortcut", shortcut), ("act", ACT)),
                body=("conv1", "bn1", "act", "conv2", "bn2"), shortcut=("shortcut",), after=("act",),
                input_first=False)


def _resnet18(depth: int, width: int, bias: bool, shape: tuple[int, int, int], classes: int) -> Part:
    """The CIFAR ResNet-18: 3x3 stem, four stages of two BasicBlocks (64/128/256/512
    channels, stride 2 from the second stage on), global average pooling, linear head."""
    layers, c = [conv(shape[0], 64, 3, 1, 1, False), norm(64, True, True), ACT], 64
    for i, w in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(_basic_block(c, w, 2 if i > 0 and j == 0 else 1))
            c = w
    return image_net(shape, seq(*layers, Part("avgpool")), linear(512, classes, bias))


FAMILIES = {f.arch: f for f in (
    Family("mlp", "MLP", _mlp, images=False, batchnorm=False),
    Family("mlp_bn", "MLP-BN", _mlp, images=False, batchnorm=True, options=(("bn", True),)),
    Family("mlp_wn", "MLP-WN", _mlp, images=False, batchnorm=False, options=(("wn", True),)),
    Family("res", "RES", _residual, images=False, batchnorm=False),
    Family("res_bn", "RES-BN", _residual, images=False, batchnorm=True, options=(("bn", True),)),
    Family("conv", "CONV", _convnet, images=True, batchnorm=False, min_depth=0),
    Family("conv_bn", "CONV-BN", _convnet, images=True, batchnorm=True, min_depth=0,
           options=(("bn", True),)),
    Family("vgg16", "VGG-16", _vgg16, images=True, batchnorm=True, fixed=(16, 64)),
    Family("resnet18", "RESNET-18", _resnet18, images=True, batchnorm=True, fixed=(18, 64)),
)}
ARCHS = tuple(FAMILIES)


# -- each model's layer table, without torch ---------------------------------------------
# What the planner needs of a model before any job starts: the matrices whose spectra are
# stored (names, shapes, a convolution's input size), multiply-adds, parameters and the
# largest activation. Computed by running the declaration's forward on shapes alone, so
# that planning (Snakemake parses the workflow on every call and in every cluster job)
# never imports torch. tests/test_models.py checks every family's table against a
# forward pass of the module built from the same declaration, on torch's meta device.

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


def short_name(path: str) -> str:
    """'hidden.fc1' -> 'fc1', 'blocks.block1.w1' -> 'block1.w1' (the MLPs' names as first
    stored); any other path, e.g. 'features.3', as it is."""
    head, _, rest = path.partition(".")
    return rest if rest and head in ("hidden", "blocks") else path


def matrix_kind(path: str, kind: str) -> str:
    """The stored kind of the matrix of a 'linear' or 'conv' part at `path`."""
    return "conv" if kind == "conv" else "output" if path == "out" else "hidden"


class _Shapes:
    """Runs a declaration's forward on one example's shape, recording each matrix layer."""

    def __init__(self, name: str, image_shape: tuple[int, ...]):
        self.name, self.image_shape = name, image_shape
        self.found: dict[str, Layer] = {}
        self.largest = 0

    def misfit(self, why: str) -> ModelError:
        return ModelError(f"model: {self.name} does not fit {'x'.join(map(str, self.image_shape))} "
                          f"inputs ({why})")

    def run(self, part: Part, path: str, x: tuple[int, ...]) -> tuple[int, ...]:
        k, a = part.kind, part.args
        if k == "block":
            def calls(paths, y):
                for p in paths:
                    y = self.run(part.part(p), f"{path}.{p}" if path else p, y)
                return y
            y = calls(part.body, x)
            if part.shortcut is not None:
                s = calls(part.shortcut, x)
                if s != y:
                    raise self.misfit(f"{path or 'the network'}: a residual sum of shapes {s} and {y}")
            return calls(part.after, y)
        if k == "seq":
            for name, child in part.children:
                x = self.run(child, f"{path}.{name}", x)
            return x
        if k == "linear":
            d_in, d_out = a[0], a[1]
            if x != (d_in,):
                raise self.misfit(f"{'its head' if path == 'out' else path} takes {d_in} features, "
                                  f"the last layer gives {math.prod(x)}")
            self.found[path] = Layer(short_name(path), matrix_kind(path, k), (d_out, d_in), None, d_out * d_in)
            self.largest = max(self.largest, d_out)
            return (d_out,)
        if k == "conv":
            c_in, c_out, kernel, stride, padding = a[:5]
            hw = x[1:]
            out = tuple((s + 2 * padding - kernel) // stride + 1 for s in hw)
            if x[0] != c_in:
                raise self.misfit(f"{path} takes {c_in} channels, the last layer gives {x[0]}")
            if min(out) < 1:
                raise self.misfit(f"{path}, a {kernel}x{kernel} convolution with stride {stride}, "
                                  f"gets a {hw[0]}x{hw[1]} image")
            positions = out[0] * out[1]
            self.found[path] = Layer(short_name(path), "conv", (c_out, c_in * kernel * kernel), (hw[0], hw[1]),
                                     c_out * c_in * kernel * kernel * positions)
            self.largest = max(self.largest, c_out * positions)
            return (c_out, *out)
        if k == "maxpool":
            out = (x[1] // 2, x[2] // 2)
            if min(out) < 1:
                raise self.misfit(f"a 2x2 max-pool gets a {x[1]}x{x[2]} image")
            self.largest = max(self.largest, x[0] * out[0] * out[1])
            return (x[0], *out)
        if k == "avgpool":
            return (x[0], 1, 1)
        if k == "unflatten":
            self.largest = max(self.largest, math.prod(a[0]))
            return tuple(a[0])
        if k == "flatten":
            return (math.prod(x),)
        if k in ("bn1d", "bn2d", "identity", "act"):
            return x
        raise ModelError(f"{path}: a part of kind {k!r} is not one of linear, conv, bn1d, bn2d, identity, "
                         "act, maxpool, avgpool, unflatten, flatten, seq, block")


def part_params(part: Part) -> int:
    """The parameters of one part's own module (its children not counted)."""
    a = part.args
    if part.kind == "linear":
        return a[0] * a[1] + (a[1] if a[2] else 0) + (1 if a[3] else 0)   # weight norm: one g per matrix
    if part.kind == "conv":
        return a[1] * a[0] * a[2] * a[2] + (a[1] if a[5] else 0)
    if part.kind in ("bn1d", "bn2d"):
        return 2 * a[0]
    return 0


def input_shape(arch: str, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """What a family's model sees of images `image_shape` (C, H, W): the images, or
    their features flattened."""
    return tuple(image_shape) if family(arch).images else (math.prod(image_shape),)


def declaration(arch: str, depth: int, width: int, bias: bool, image_shape: tuple[int, int, int],
                num_classes: int) -> Part:
    """The declared network of a family on images of `image_shape` (C, H, W)."""
    check_sizes(arch, depth, width)
    f = family(arch)
    return f.declare(depth, width, bias, tuple(image_shape), num_classes, **dict(f.options))


def table(net: Part, name: str, image_shape: tuple[int, ...]) -> LayerTable:
    """The layer table of a declared network on (flattened) images of `image_shape`."""
    s = _Shapes(name, tuple(image_shape))
    s.run(net, "", (math.prod(image_shape),))
    found = [s.found[path] for path, p in net.walk() if p.kind in ("linear", "conv")]
    if len(found) != len(s.found):
        raise ModelError(f"model: {name} calls a matrix layer more than once or declares one it never calls")
    return LayerTable(tuple(found), sum(part_params(p) for _, p in net.walk()), s.largest)


@functools.lru_cache(maxsize=256)
def layers(arch: str, depth: int, width: int, bias: bool, image_shape: tuple[int, int, int],
           num_classes: int) -> LayerTable:
    """The layer table of a family's model on images of `image_shape` (C, H, W). A model
    that does not fit its input fails here, before any job starts."""
    net = declaration(arch, depth, width, bias, image_shape, num_classes)
    return table(net, model_name(arch, depth, width), image_shape)
