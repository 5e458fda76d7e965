"""The reference: one plain nn.Module and torch.optim.SGD per configuration.

The batched engine is the only trainer the pipeline uses; this loop exists so that
tests can prove the engine computes the same thing, and so `rankbias bench` has an
honest baseline. It is fed exactly the engine's data order (`epoch_order`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import RunSpec


class Block(nn.Module):
    """x -> x + relu(bn2(w2 relu(bn1(w1 x)))) (the paper's residual block; BN optional)."""

    def __init__(self, width: int, bn: bool):
        super().__init__()
        self.w1 = nn.Linear(width, width)
        self.bn1 = nn.BatchNorm1d(width) if bn else nn.Identity()
        self.w2 = nn.Linear(width, width)
        self.bn2 = nn.BatchNorm1d(width) if bn else nn.Identity()

    def forward(self, x):
        return x + F.relu(self.bn2(self.w2(F.relu(self.bn1(self.w1(x))))))


class Net(nn.Module):
    """MLP-L-H, MLP-BN-L-H, RES-L-H or RES-BN-L-H on flattened inputs."""

    def __init__(self, arch: str, depth: int, width: int, in_dim: int, num_classes: int):
        super().__init__()
        self.arch = arch
        bn = arch.endswith("_bn")
        if arch.startswith("mlp"):
            self.hidden = nn.ModuleDict()
            for i in range(1, depth + 1):
                self.hidden[f"fc{i}"] = nn.Linear(in_dim if i == 1 else width, width)
                self.hidden[f"bn{i}"] = nn.BatchNorm1d(width) if bn else nn.Identity()
        else:
            self.stem = nn.Linear(in_dim, width)
            self.stem_bn = nn.BatchNorm1d(width) if bn else nn.Identity()
            self.blocks = nn.ModuleDict({f"block{i}": Block(width, bn) for i in range(1, depth + 1)})
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        if self.arch.startswith("mlp"):
            layers = list(self.hidden.values())
            for fc, bn in zip(layers[::2], layers[1::2]):
                x = F.relu(bn(fc(x)))
        else:
            x = self.stem_bn(self.stem(x))
            for block in self.blocks.values():
                x = block(x)
        return self.out(x)

    def matrices(self) -> list[tuple[str, str, torch.Tensor]]:
        """(name, kind, weight) of every weight matrix: hidden ones, then the output layer."""
        out = []
        for name, p in self.named_parameters():
            if p.dim() == 2:
                short = name.removesuffix(".weight").removeprefix("hidden.").removeprefix("blocks.")
                out.append((short, "output" if short == "out" else "hidden", p))
        return out


def build_net(spec: RunSpec, in_dim: int, num_classes: int) -> Net:
    """The seed-determined initialisation of a run (PyTorch's default init)."""
    torch.manual_seed(spec.seed)
    return Net(spec.arch, spec.depth, spec.width, in_dim, num_classes)


def epoch_order(spec: RunSpec, epoch: int, n: int) -> torch.Tensor:
    """The run's permutation of its n training samples for 0-based `epoch` (on the CPU)."""
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch + 1)
    return torch.randperm(n, generator=g)


def loss_fn(loss: str, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE on logits, or MSE against one-hot labels averaged over batch and classes."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction=reduction)
    # one-hot by comparison: F.one_hot checks the labels' range on the host, a sync
    # that a captured CUDA graph cannot contain
    one_hot = (y.unsqueeze(-1) == torch.arange(logits.shape[-1], device=y.device)).to(logits.dtype)
    err = (logits - one_hot).pow(2).mean(-1)
    return err.mean() if reduction == "mean" else err


def train_reference(spec: RunSpec, x_train, y_train, x_test, y_test, num_classes: int):
    """Train one run the plain way. Returns (net, history): history has, per epoch
    0..E, the eval-mode train/test loss and accuracy and the weight matrices."""
    net = build_net(spec, x_train.shape[1], num_classes).to(x_train.device, x_train.dtype)
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum,
                          weight_decay=spec.weight_decay)
    n, B = x_train.shape[0], spec.batch_size
    history = [evaluate_reference(net, spec, x_train, y_train, x_test, y_test)]
    for epoch in range(spec.epochs):
        for group in opt.param_groups:
            group["lr"] = spec.lr_at(epoch)
        net.train()
        order = epoch_order(spec, epoch, n).to(x_train.device)
        for t in range(spec.steps_per_epoch(n)):    # the last batch may be partial
            idx = order[t * B:(t + 1) * B]
            opt.zero_grad(set_to_none=True)
            loss_fn(spec.loss, net(x_train[idx]), y_train[idx]).backward()
            opt.step()
        history.append(evaluate_reference(net, spec, x_train, y_train, x_test, y_test))
    return net, history


@torch.no_grad()
def evaluate_reference(net: Net, spec: RunSpec, x_train, y_train, x_test, y_test) -> dict:
    net.eval()
    row = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        logits = net(x)
        row[f"{split}_loss"] = loss_fn(spec.loss, logits, y).item()
        row[f"{split}_acc"] = (logits.argmax(-1) == y).float().mean().item()
    row["matrices"] = {name: w.detach().clone() for name, _, w in net.matrices()}
    net.train()
    return row
