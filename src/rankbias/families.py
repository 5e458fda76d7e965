"""The model families rankbias knows: names, sizes and which class builds each.

The registry of `rankbias.models` without torch, so that the planner (which Snakemake
imports on every parse) can parse and check model names. The modules themselves, and
everything derived from them (layers, shapes, costs), are in `rankbias.models`. Adding
a model is a class there and an entry in FAMILIES here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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
    module: str                         # its nn.Module class in rankbias.models
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
