"""Every architecture rankbias trains, defined once, and what both trainers share.

A model is a plain `nn.Module` built from standard torch layers (Linear, Conv2d,
BatchNorm, weight norm, pooling). The reference loop trains it as it is; the batched
engine runs the same module's forward with its layers swapped for batched ones
(`rankbias.train.batched`); the stored matrices, the cost model, the plan-time shape
checks and the test fabricator read its layer table, which `rankbias.core.families.layers`
computes from the shapes alone (no torch at planning time; a test checks each table
against the module's own forward pass on the meta device). Adding a model is a class
here, its table and an entry in `rankbias.core.families.FAMILIES`.

Inputs arrive flattened, [N, C*H*W]; a model that sees images unflattens them with
`nn.Unflatten` and flattens before its head with `nn.Flatten`, so the engine knows
where the image part of a network begins and ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from rankbias.core.families import ACTIVATIONS, LEAKY_SLOPE, VGG16_LAYERS, ModelError, check_sizes, family, input_shape
from rankbias.core.spec import DATASET_SHAPES

@dataclass(frozen=True)
class Arch:
    """What a model's constructor needs: family, sizes, options, input and classes."""
    depth: int
    width: int
    activation: str
    bias: bool
    in_shape: tuple[int, ...]     # (features,) or (channels, height, width)
    num_classes: int

    def act(self) -> nn.Module:
        return nn.LeakyReLU(LEAKY_SLOPE) if self.activation == "leaky_relu" else nn.ReLU()


# -- the families -------------------------------------------------------------------

class MLP(nn.Module):
    """MLP-L-H (and -BN, -WN): L hidden Linear layers of width H, each followed by
    BatchNorm (-BN) and the activation; -WN normalises each hidden weight
    (W = g V / ||V||_F, one scalar g per matrix, as the authors' `mlp_wn`)."""

    def __init__(self, a: Arch, bn: bool = False, wn: bool = False):
        super().__init__()
        self.hidden = nn.ModuleDict()
        d = math.prod(a.in_shape)
        for i in range(1, a.depth + 1):
            fc = nn.Linear(d if i == 1 else a.width, a.width, bias=a.bias)
            # torch annotates dim as int but documents dim=None: the norm over the whole matrix
            self.hidden[f"fc{i}"] = weight_norm(fc, dim=None) if wn else fc  # type: ignore[arg-type]
            self.hidden[f"bn{i}"] = nn.BatchNorm1d(a.width) if bn else nn.Identity()
        self.act = a.act()
        self.out = nn.Linear(a.width, a.num_classes, bias=a.bias)

    def forward(self, x):
        layers = list(self.hidden.values())
        for fc, bn in zip(layers[::2], layers[1::2]):
            x = self.act(bn(fc(x)))
        return self.out(x)


class ResidualBlock(nn.Module):
    """x -> x + act(bn2(w2 act(bn1(w1 x)))) (the paper's residual block; BN optional)."""

    def __init__(self, a: Arch, bn: bool):
        super().__init__()
        self.w1 = nn.Linear(a.width, a.width, bias=a.bias)
        self.bn1 = nn.BatchNorm1d(a.width) if bn else nn.Identity()
        self.w2 = nn.Linear(a.width, a.width, bias=a.bias)
        self.bn2 = nn.BatchNorm1d(a.width) if bn else nn.Identity()
        self.act = a.act()

    def forward(self, x):
        return x + self.act(self.bn2(self.w2(self.act(self.bn1(self.w1(x))))))


class ResidualMLP(nn.Module):
    """RES-L-H (and -BN): a Linear stem (with BN, no activation), L residual blocks."""

    def __init__(self, a: Arch, bn: bool = False):
        super().__init__()
        self.stem = nn.Linear(math.prod(a.in_shape), a.width, bias=a.bias)
        self.stem_bn = nn.BatchNorm1d(a.width) if bn else nn.Identity()
        self.blocks = nn.ModuleDict({f"block{i}": ResidualBlock(a, bn) for i in range(1, a.depth + 1)})
        self.out = nn.Linear(a.width, a.num_classes, bias=a.bias)

    def forward(self, x):
        x = self.stem_bn(self.stem(x))
        for block in self.blocks.values():
            x = block(x)
        return self.out(x)


def _conv_bn_act(c_in, c_out, a: Arch, bn: bool, kernel=3, stride=1, padding=1, act=True):
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=a.bias)]
    layers += [nn.BatchNorm2d(c_out)] if bn else []
    layers += [a.act()] if act else []
    return layers


class ConvNet(nn.Module):
    """CONV-L-W (and -BN), the authors' ConvNet: two stride-2 2x2 convolutions to
    width W (the second followed by the activation), L 3x3 same-padding convolutions
    with the activation, BatchNorm after every convolution in -BN, a linear head."""

    def __init__(self, a: Arch, bn: bool = False):
        super().__init__()
        c, h, w = a.in_shape
        layers = (_conv_bn_act(c, a.width, a, bn, 2, 2, 0, act=False)
                  + _conv_bn_act(a.width, a.width, a, bn, 2, 2, 0))
        for _ in range(a.depth):
            layers += _conv_bn_act(a.width, a.width, a, bn)
        self.image = nn.Unflatten(1, a.in_shape)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(a.width * (h // 4) * (w // 4), a.num_classes, bias=a.bias)

    def forward(self, x):
        return self.out(self.flatten(self.features(self.image(x))))


class VGG16(nn.Module):
    """VGG-16 with the authors' CIFAR configuration: 3x3 conv-BN-activation layers
    and 2x2 max-pools (VGG16_LAYERS), then a 512 -> classes linear head."""

    def __init__(self, a: Arch):
        super().__init__()
        layers, c = [], a.in_shape[0]
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += _conv_bn_act(c, v, a, bn=True)
                c = v
        self.image = nn.Unflatten(1, a.in_shape)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(c, a.num_classes, bias=a.bias)

    def forward(self, x):
        return self.out(self.flatten(self.features(self.image(x))))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 conv-BN layers plus a shortcut (a 1x1 conv-BN where the shape
    changes), the activation after the sum. Its convolutions carry no bias: BatchNorm
    follows each."""

    def __init__(self, c_in, c_out, stride, a: Arch):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.act = a.act()

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18: 3x3 stem, four stages of two BasicBlocks (64/128/256/512
    channels, stride 2 from the second stage on), global average pooling, linear head."""

    def __init__(self, a: Arch):
        super().__init__()
        self.image = nn.Unflatten(1, a.in_shape)
        layers = [nn.Conv2d(a.in_shape[0], 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), a.act()]
        c = 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(BasicBlock(c, width, 2 if i > 0 and j == 0 else 1, a))
                c = width
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(512, a.num_classes, bias=a.bias)

    def forward(self, x):
        return self.out(self.flatten(self.features(self.image(x))))


# -- building a run's network ----------------------------------------------------------

def build(arch: str, depth: int, width: int, activation: str, bias: bool,
          image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network of a family on inputs of `image_shape`, with torch's default init."""
    check_sizes(arch, depth, width)
    if activation not in ACTIVATIONS:
        raise ModelError(f"activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    a = Arch(depth, width, activation, bias, input_shape(arch, image_shape), num_classes)
    f = family(arch)
    return globals()[f.module](a, **dict(f.options))


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

def short_name(path: str) -> str:
    """'hidden.fc1' -> 'fc1', 'blocks.block1.w1' -> 'block1.w1' (the MLPs' names as first
    stored); any other path, e.g. 'features.3', as it is."""
    head, _, rest = path.partition(".")
    return rest if rest and head in ("hidden", "blocks") else path


def matrix_paths(net: nn.Module) -> list[tuple[str, str, str]]:
    """(name, kind, module path) of every Linear and Conv2d in order; the head is 'out'."""
    out = []
    for path, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            out.append((short_name(path), "conv", path))
        elif isinstance(m, nn.Linear):
            out.append((short_name(path), "output" if path == "out" else "hidden", path))
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
