"""Batched forms of torch's layers: one network's forward run for K members at once.

`batched(net, ...)` returns a copy of a model (`rankbias.train.models`) whose layers are
swapped for the ones below, each reading the pack's stacked [K, ...] parameters and
BatchNorm statistics. The model's own forward (blocks, residual sums, activations,
pooling) runs unchanged, so no architecture is written twice.

Two layouts carry the K members through a network:
- flat features as [K, B, H] (Linear: one batched matmul);
- images as [B, K*C, H, W], the members as channel groups (the HFTA layout):
  a convolution is one grouped conv2d (groups=K), BatchNorm2d over K*C channels gives
  each member its own statistics, and pooling and activations act per channel as
  they would for one member. `nn.Unflatten` and `nn.Flatten` mark where the image
  part begins and ends, and switch layouts.
Measured against functorch's vmap over `functional_call` (docs/engine.md, "Batched
convolutions"), the grouped convolution was the faster on the CPU.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from rankbias.train.models import ModelError

# Parameter-free layers that act per channel or per element, hence on either layout
# exactly as on one member's tensor.
LAYOUT_FREE = (nn.Identity, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Sequential)


# BatchNorm's running-statistics momentum: torch's nn.BatchNorm default, which the
# authors' models use. A constant of every pack, so a captured CUDA graph may bake it in.
BN_MOMENTUM = 0.1


class StepInputs:
    """What one step needs besides the pack, all tensors (a CUDA graph replays them from
    static buffers): the [K, B] sample indices and their [K, B] training labels
    (`models.epoch_labels`: the true ones unless the member has label noise), and [K, 1]
    columns (loss weight, -lr, weight decay, momentum). Here, below the engine that
    fills it, because the hand-written chain step reads it too."""
    __slots__ = ("idx", "y", "weight", "neg_lr", "wd", "mom")
    idx: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor
    neg_lr: torch.Tensor
    wd: torch.Tensor
    mom: torch.Tensor

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class BatchContext:
    """What the batched layers read besides their parameters: the number of members,
    training or evaluation, and BatchNorm's momentum (a constant of the pack)."""

    def __init__(self, K: int, bn_momentum: float = BN_MOMENTUM):
        self.K, self.train, self.bn_momentum = K, False, bn_momentum


# Elements of one member's matrix, and rows of its batch, from which a wide layer's
# forward is w @ x^T (below).
WIDE_MATRIX = 1 << 16
WIDE_ROWS = 16


class BatchedLinearFn(torch.autograd.Function):
    """x [K, B, in] @ w[k].T + b[k] for every member, with a weight gradient that is
    born contiguous in w's own [K, out, in] layout.

    Autograd's own backward of `baddbmm(b, x, w.transpose(1, 2))` yields the weight
    gradient as a transposed view, which AccumulateGrad then copies into w's layout:
    that copy was 40% of a CPU step. Here it is one bmm, g^T @ x.

    A large wide matrix (in >= 4 out and at least WIDE_MATRIX elements: the first
    layer on images) is multiplied as (w @ x^T)^T, w the untransposed left operand,
    for batches of WIDE_ROWS rows or more: MKL repacks a transposed right operand on
    every call, which made `x @ w^T` take 2.6-2.9 ms for K=16 [100, 3072] weights
    against 0.8 ms (one read of w) this way; 1.24x on the whole K=16 step of
    MLP-BN-10-100 (A/B in one process). At B=32 it is 2.1x for [100, 1024], at B=128
    even, but at B=8 the plain form is 2.1x the faster (21 against 44 us, K=1), so
    narrow batches, square and small layers keep the plain form.
    Both forms sum the same products in another order: float64 outputs agree to
    rounding (tests/test_engine.py).
    """

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return linear_forward(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        return gx, torch.bmm(g.transpose(1, 2), x), g.sum(1) if ctx.has_bias else None


def linear_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [K, B, in] @ w[k].T + b[k]: the batched Linear's forward (see BatchedLinearFn)."""
    if w.shape[2] >= 4 * w.shape[1] and w.shape[1] * w.shape[2] >= WIDE_MATRIX and x.shape[1] >= WIDE_ROWS:
        xt = x.transpose(1, 2)
        out = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)
        return out.transpose(1, 2).contiguous()
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


class Linear(nn.Module):
    """nn.Linear (or its weight-normalised form) on [K, B, in]; in evaluation a
    shared [n, in] input is broadcast to every member."""

    def __init__(self, path: str, module: nn.Linear, params: dict):
        super().__init__()
        self.wn = parametrize.is_parametrized(module, "weight")
        if self.wn:
            chain = module.get_submodule("parametrizations.weight")
            assert isinstance(chain, parametrize.ParametrizationList)  # is_parametrized said so
            norm = chain[0]
            if type(norm).__name__ != "_WeightNorm" or norm.dim != -1:
                raise ModelError(f"{path}: only weight norm over the whole matrix (dim=None) is batched")
            self.g = params[f"{path}.parametrizations.weight.original0"]
            self.v = params[f"{path}.parametrizations.weight.original1"]
        else:
            self.w = params[f"{path}.weight"]
        self.b = params.get(f"{path}.bias")

    def matrix(self) -> torch.Tensor:
        """[K, out, in]: the weight (W = g V / ||V||_F under weight norm)."""
        if not self.wn:
            return self.w
        K = self.v.shape[0]
        return self.v * (self.g.view(K, 1, 1) / torch.linalg.vector_norm(self.v, dim=(1, 2), keepdim=True))

    def forward(self, x):
        w = self.matrix()
        if x.dim() == 2:  # evaluation: one input batch shared by every member, one matmul
            # [n, in] @ [in, K*out]: x is read once, not broadcast to [K, n, in] and
            # copied (1.7x on the first layer of MLP-BN-5-100, K=4, n=4096)
            K, out, d = w.shape
            y = torch.mm(x, w.reshape(K * out, d).t()).view(-1, K, out).transpose(0, 1)
            return y if self.b is None else y + self.b.unsqueeze(1)
        return BatchedLinearFn.apply(x, w, self.b)


class Conv2d(nn.Module):
    """nn.Conv2d on [B, K*C, H, W] as one grouped convolution, the members as groups."""

    def __init__(self, path: str, module: nn.Conv2d, params: dict, ctx: BatchContext):
        super().__init__()
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ModelError(f"{path}: only ungrouped, zero-padded convolutions are batched")
        self.ctx, self.w, self.b = ctx, params[f"{path}.weight"], params.get(f"{path}.bias")
        self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation

    def matrix(self) -> torch.Tensor:
        """[K, out, in*kh*kw]: the kernel as a matrix."""
        return self.w.flatten(2)

    def forward(self, x):
        w = self.w.flatten(0, 1)                      # [K*out, in, kh, kw], a view
        b = None if self.b is None else self.b.flatten()
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups=self.ctx.K)


class BatchNorm(nn.Module):
    """BatchNorm1d on [K, B, H] or BatchNorm2d on [B, K*C, H, W], each member with its
    own batch statistics and its own running statistics."""

    def __init__(self, path: str, module: nn.modules.batchnorm._BatchNorm, params: dict,
                 running: dict, ctx: BatchContext):
        super().__init__()
        if not (module.affine and module.track_running_stats):
            raise ModelError(f"{path}: only affine BatchNorm with running statistics is batched")
        self.ctx, self.eps, self.image = ctx, module.eps, isinstance(module, nn.BatchNorm2d)
        self.w, self.b = params[f"{path}.weight"], params[f"{path}.bias"]
        self.rm, self.rv = running[f"{path}.running_mean"], running[f"{path}.running_var"]

    def forward(self, x):
        ctx = self.ctx
        momentum = ctx.bn_momentum if ctx.train else 0.0
        if self.image:
            # rm, rv are [K, C], contiguous: their flat views share storage, so the
            # fused kernel updates every member's running statistics in place
            return F.batch_norm(x, self.rm.view(-1), self.rv.view(-1), self.w.flatten(),
                                self.b.flatten(), training=ctx.train, momentum=momentum, eps=self.eps)
        if not ctx.train:
            w, b, rm, rv = self.w.unsqueeze(1), self.b.unsqueeze(1), self.rm, self.rv
            return (x - rm.unsqueeze(1)) * torch.rsqrt(rv.unsqueeze(1) + self.eps) * w + b
        # every member's batch as B rows of K*H channels: one fused batch_norm, the
        # variance unbiased by the step's own row count (a partial batch's included)
        K, B, H = x.shape
        y = F.batch_norm(x.transpose(0, 1).reshape(B, K * H), self.rm.view(-1), self.rv.view(-1),
                         self.w.reshape(-1), self.b.reshape(-1), training=True,
                         momentum=momentum, eps=self.eps)
        return y.view(B, K, H).transpose(0, 1)


class Unflatten(nn.Module):
    """[K, B, C*H*W] (or a shared [n, C*H*W]) -> [B, K*C, H, W]."""

    def __init__(self, module: nn.Unflatten, ctx: BatchContext):
        super().__init__()
        self.ctx, self.shape = ctx, tuple(module.unflattened_size)

    def forward(self, x):
        C, H, W = self.shape
        if x.dim() == 2:
            return x.view(-1, C, H, W).repeat(1, self.ctx.K, 1, 1)
        K, B = x.shape[:2]
        return x.view(K, B, C, H, W).transpose(0, 1).reshape(B, K * C, H, W)


class Flatten(nn.Module):
    """[B, K*C, H, W] -> [K, B, C*H*W]."""

    def __init__(self, ctx: BatchContext):
        super().__init__()
        self.ctx = ctx

    def forward(self, x):
        return x.reshape(x.shape[0], self.ctx.K, -1).transpose(0, 1)


def _batched_layer(path: str, m: nn.Module, params: dict, running: dict, ctx: BatchContext):
    if isinstance(m, nn.Linear):
        return Linear(path, m, params)
    if isinstance(m, nn.Conv2d):
        return Conv2d(path, m, params, ctx)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return BatchNorm(path, m, params, running, ctx)
    if isinstance(m, nn.Unflatten):
        return Unflatten(m, ctx)
    if isinstance(m, nn.Flatten):
        return Flatten(ctx)
    return None


def batched(net: nn.Module, params: dict[str, torch.Tensor], running: dict[str, torch.Tensor],
            ctx: BatchContext) -> nn.Module:
    """A copy of `net` whose layers compute every member at once from `params` and
    `running` (stacked [K, ...], keyed by `net`'s parameter and buffer names)."""
    twin = copy.deepcopy(net)

    def swap(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            layer = _batched_layer(path, child, params, running, ctx)
            if layer is not None:
                setattr(module, name, layer)
            elif list(child.children()):
                swap(child, path + ".")
            elif not isinstance(child, LAYOUT_FREE):
                raise ModelError(f"{path}: the batched engine has no form of {type(child).__name__}; "
                                 "add one to rankbias.train.batched")

    swap(twin, "")
    left = [n for n, _ in twin.named_parameters()]
    if left:
        raise ModelError(f"parameters outside the batched layers: {', '.join(left)}")
    return twin


def matrix_layer(model: nn.Module, path: str) -> Linear | Conv2d:
    """The batched layer at `path` of a `batched` model that holds a weight matrix."""
    layer = model.get_submodule(path)
    if not isinstance(layer, (Linear, Conv2d)):
        raise ModelError(f"{path}: a {type(layer).__name__}, not a batched Linear or Conv2d")
    return layer
