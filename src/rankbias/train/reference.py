"""The reference: one plain nn.Module and torch.optim.SGD per configuration.

The batched engine is the only trainer the pipeline uses; this loop exists so that
tests can prove the engine computes the same thing, and so `rankbias bench` has an
honest baseline. It is fed exactly the engine's data order (`epoch_order`) and
training labels (`epoch_labels`: with label noise, the same draws) and trains the
same model definition (`rankbias.train.models`) as an ordinary nn.Module.
"""
from __future__ import annotations

import torch
from torch import nn

from rankbias.train.models import build_net, epoch_labels, epoch_order, loss_fn, matrices
from rankbias.core.spec import RunSpec


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
        labels = epoch_labels(spec, epoch, y_train[order], num_classes)   # clean unless label_noise
        for t in range(spec.steps_per_epoch(n)):    # the last batch may be partial
            idx = order[t * B:(t + 1) * B]
            opt.zero_grad(set_to_none=True)
            loss_fn(spec.loss, net(x_train[idx]), labels[t * B:(t + 1) * B]).backward()
            opt.step()
        history.append(evaluate_reference(net, spec, x_train, y_train, x_test, y_test))
    return net, history


@torch.no_grad()
def evaluate_reference(net: nn.Module, spec: RunSpec, x_train, y_train, x_test, y_test) -> dict:
    net.eval()
    row: dict[str, float | dict[str, torch.Tensor]] = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        logits = net(x)
        row[f"{split}_loss"] = loss_fn(spec.loss, logits, y).item()
        row[f"{split}_acc"] = (logits.argmax(-1) == y).float().mean().item()
    row["matrices"] = {name: w.detach().clone() for name, _, w in matrices(net)}
    net.train()
    return row
