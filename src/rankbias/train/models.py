"""Every architecture rankbias trains, built from its declaration, and what both trainers share.

A model is a plain `nn.Module` of standard torch layers (Linear, Conv2d, BatchNorm,
weight norm, pooling), built by walking its family's torch-free declaration
(`rankbias.core.families`: the one place an architecture is written; the layer table
the planner, the cost model and the stored matrices read comes from the same
declaration, and a test checks each table against the built module's forward pass on
the meta device). The reference loop trains it as it is; the batched engine runs the
same module's forward with its layers swapped for batched ones (`rankbias.train.batched`).
Adding a model touches rankbias.core.families only (docs/add-a-model.md).

Inputs arrive flattened, [N, C*H*W]; a model that sees images unflattens them with
`nn.Unflatten` and flattens before its head with `nn.Flatten`, so the engine knows
where the image part of a network begins and ends.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from rankbias.core.families import ACTIVATIONS, LEAKY_SLOPE, ModelError, Part, declaration, matrix_kind, short_name
from rankbias.core.spec import DATASET_SHAPES

class Block(nn.Module):
    """A declared block (`families.Part` of kind 'block'): its parts, called as declared."""

    def __init__(self, part: Part, children: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, child in children:
            self.add_module(name, child)
        # one attribute, not a part's name: the parts may be called anything, 'shortcut' included
        self.program = (part.body, part.shortcut, part.after, part.input_first)

    def _calls(self, paths: tuple[str, ...], x):
        for path in paths:
            x = self.get_submodule(path)(x)
        return x

    def forward(self, x):
        body, shortcut, after, input_first = self.program
        y = self._calls(body, x)
        if shortcut is not None:
            s = self._calls(shortcut, x)
            y = s + y if input_first else y + s
        return self._calls(after, y)


def module(part: Part, activation: str) -> nn.Module:
    """The nn.Module of a declared part, its children created in the order declared (which
    fixes parameter names and order and the seed's draws: torch's default init)."""
    k, a = part.kind, part.args
    if k in ("dict", "seq", "block"):
        children = [(name, module(child, activation)) for name, child in part.children]
        if k == "dict":
            return nn.ModuleDict(dict(children))
        if k == "seq":
            return nn.Sequential(*(m for _, m in children))
        return Block(part, children)
    if k == "linear":
        fc = nn.Linear(a[0], a[1], bias=a[2])
        # torch annotates dim as int but documents dim=None: the norm over the whole matrix
        return weight_norm(fc, dim=None) if a[3] else fc  # type: ignore[arg-type]
    if k == "conv":
        return nn.Conv2d(a[0], a[1], a[2], a[3], a[4], bias=a[5])
    if k == "bn1d":
        return nn.BatchNorm1d(a[0])
    if k == "bn2d":
        return nn.BatchNorm2d(a[0])
    if k == "act":
        return nn.LeakyReLU(LEAKY_SLOPE) if activation == "leaky_relu" else nn.ReLU()
    simple: dict[str, Callable[[], nn.Module]] = {"identity": nn.Identity, "maxpool": lambda: nn.MaxPool2d(2, 2), "flatten": nn.Flatten,
              "avgpool": lambda: nn.AdaptiveAvgPool2d(1), "unflatten": lambda: nn.Unflatten(1, a[0])}
    if k not in simple:
        raise ModelError(f"a part of kind {k!r} has no module; expected one of linear, conv, bn1d, bn2d, "
                         f"act, {', '.join(simple)}, dict, seq, block")
    return simple[k]()


# -- building a run's network ----------------------------------------------------------

def build(arch: str, depth: int, width: int, activation: str, bias: bool,
          image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network of a family on inputs of `image_shape`, with torch's default init."""
    net = declaration(arch, depth, width, bias, image_shape, num_classes)
    if activation not in ACTIVATIONS:
        raise ModelError(f"activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return module(net, activation)


def build_net(spec, in_dim: int, num_classes: int) -> nn.Module:
    """The seed-determined initialisation of a run (PyTorch's default init), on
    `in_dim` input features, which must be the run's dataset's images flattened."""
    shape = DATASET_SHAPES[spec.dataset]
    if in_dim != math.prod(shape):
        raise ModelError(f"model: {spec.model} expects {spec.dataset}'s {'x'.join(map(str, shape))} "
                         f"inputs ({math.prod(shape)} features), the data has {in_dim}")
    torch.manual_seed(spec.seed)
    return build(spec.arch, spec.depth, spec.width, spec.activation, spec.bias, shape, num_classes)


# -- the matrices whose spectra are stored -----------------------------------------------

def matrix_paths(net: nn.Module) -> list[tuple[str, str, str]]:
    """(name, kind, module path) of every Linear and Conv2d in order; the head is 'out'."""
    out = []
    for path, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            out.append((short_name(path), matrix_kind(path, "conv"), path))
        elif isinstance(m, nn.Linear):
            out.append((short_name(path), matrix_kind(path, "linear"), path))
    return out


def matrix(module: nn.Module) -> torch.Tensor:
    """A layer's matrix: the (effective, for weight norm) weight, a kernel as [out, in*kh*kw]."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise ModelError(f"{type(module).__name__} has no weight tensor to take as a matrix")
    return weight.flatten(1)


def matrices(net: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(name, kind, matrix) of every weight matrix: hidden ones, then the output layer."""
    return [(name, kind, matrix(net.get_submodule(path))) for name, kind, path in matrix_paths(net)]


# -- shared by both trainers -------------------------------------------------------------

def epoch_order(spec, epoch: int, n: int) -> torch.Tensor:
    """The run's permutation of its n training samples for 0-based `epoch` (on the CPU)."""
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch + 1)
    return torch.randperm(n, generator=g)


# Added to epoch_order's seed for the label noise's Generator, so that its draws never
# share a seed with any run's data order (seeds below about 10^6).
LABEL_NOISE_SEED_OFFSET = 1 << 40


def epoch_labels(spec, epoch: int, y_ordered: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels the run trains on in 0-based `epoch`, given its samples' true labels
    in its epoch order (`y[epoch_order(spec, epoch, n)]`), on y's device.

    With label_noise p > 0 (check R3), each label is kept with probability 1 - p and
    otherwise replaced by a class drawn uniformly from all `num_classes`, its own
    included (so a label changes with probability p (C-1)/C). A sample appears once an
    epoch, so it is drawn afresh at every step it is in. The draws come from a CPU
    Generator seeded by the run's seed and the epoch (epoch_order's seed plus
    LABEL_NOISE_SEED_OFFSET): no generator state carries from one epoch to the next, so
    a run resumed from a checkpoint draws exactly what an uninterrupted one did, and
    the engine and the reference loop draw alike. At p = 0 the labels are returned as
    they are, and nothing is drawn."""
    if spec.label_noise == 0:
        return y_ordered
    g = torch.Generator().manual_seed(LABEL_NOISE_SEED_OFFSET + spec.seed * 1_000_003 + epoch + 1)
    n = y_ordered.shape[0]
    redraw = torch.rand(n, generator=g, dtype=torch.float64) < spec.label_noise
    drawn = torch.randint(num_classes, (n,), generator=g)
    return torch.where(redraw.to(y_ordered.device), drawn.to(y_ordered.device, y_ordered.dtype), y_ordered)


def loss_fn(loss: str, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE on logits, or MSE against one-hot labels averaged over batch and classes."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction=reduction)
    err = (logits - _one_hot(y, logits)).pow(2).mean(-1)
    return err.mean() if reduction == "mean" else err


def _one_hot(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # by comparison: F.one_hot checks the labels' range on the host, a sync that a
    # captured CUDA graph cannot contain
    return (y.unsqueeze(-1) == torch.arange(logits.shape[-1], device=y.device)).to(logits.dtype)


def weighted_loss(loss: str, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """For a pack's step, logits [K, B, C], labels [K, B], weights [K]: each member's
    mean mini-batch `loss_fn` times its weight (0 once frozen), [K]."""
    K = logits.shape[0]
    return loss_fn(loss, logits.flatten(0, 1), y.flatten(), "none").view(K, -1).mean(1) * weight


@torch.no_grad()
def weighted_loss_and_grad(loss: str, logits: torch.Tensor, y: torch.Tensor,
                           weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weighted_loss` and the gradient of its sum at the logits, [K, B, C], without an
    autograd graph. It runs the ops autograd runs for `weighted_loss` (cross_entropy is log_softmax then nll_loss; their
    backward, and mean's, mul's and pow's, as autograd computes them), so both agree
    bit for bit (tests/test_models.py); the hand-differentiated step uses it, saving
    autograd's graph (about 0.15 ms a step on this CPU)."""
    K, B, C = logits.shape
    flat, yf = logits.reshape(K * B, C), y.reshape(-1)
    g_rows = (weight.view(K, 1).expand(K, B) / B).reshape(-1)      # d(sum)/d(per-sample loss)
    if loss == "ce":
        ls = torch.log_softmax(flat, -1)
        per, total = torch.ops.aten.nll_loss_forward(ls, yf, None, 0, -100)
        g_ls = torch.ops.aten.nll_loss_backward(g_rows, ls, yf, None, 0, -100, total)
        g = torch.ops.aten._log_softmax_backward_data(g_ls, ls, -1, flat.dtype)
    else:
        d = flat - _one_hot(yf, flat)
        per = d.pow(2).mean(-1)
        g = (g_rows.unsqueeze(-1).expand(K * B, C) / C) * (2 * d)
    return per.view(K, B).mean(1) * weight, g.view(K, B, C)
