"""The reference: one plain nn.Module and torch.optim.SGD per configuration.

The batched engine is the only trainer the pipeline uses; this loop exists so that
tests can prove the engine computes the same thing, and so `rankbias bench` has an
honest baseline. It is fed exactly the engine's data order (`epoch_order`) and
training labels (`epoch_labels`: with label noise, the same draws) and trains the
same model definition (`rankbias.train.models`) as an ordinary nn.Module.

`ReferenceRun` is the loop's one definition: the module and optimiser built from a
RunSpec, an epoch's order and labels, and one SGD step. `train_reference` runs it
through whole epochs; the tests step it beside a pack, and the bench times its steps.
"""
from __future__ import annotations

import torch
from torch import nn

from rankbias.train.models import build_net, epoch_labels, epoch_order, loss_fn, matrices
from rankbias.core.spec import RunSpec


class ReferenceRun:
    """One configuration the plain way: `build_net(spec)` on the training data's device
    and dtype, and torch.optim.SGD with the spec's lr, momentum and weight decay."""

    def __init__(self, spec: RunSpec, x_train: torch.Tensor, y_train: torch.Tensor, num_classes: int):
        self.spec, self.x, self.y, self.num_classes = spec, x_train, y_train, num_classes
        self.net = build_net(spec, x_train.shape[1], num_classes).to(x_train.device, x_train.dtype)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=spec.lr, momentum=spec.momentum,
                                   weight_decay=spec.weight_decay)
        self.order = self.labels = torch.empty(0, dtype=torch.long)

    def start_epoch(self, epoch: int) -> None:
        """The 0-based epoch's lr (`spec.lr_at`), training mode, and its data order and
        training labels in that order (clean unless label_noise), for `batch`."""
        for group in self.opt.param_groups:
            group["lr"] = self.spec.lr_at(epoch)
        self.net.train()
        self.order = epoch_order(self.spec, epoch, self.x.shape[0]).to(self.x.device)
        self.labels = epoch_labels(self.spec, epoch, self.y[self.order], self.num_classes)

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mini-batch t of the epoch `start_epoch` began (the last one may be partial)."""
        B = self.spec.batch_size
        return self.x[self.order[t * B:(t + 1) * B]], self.labels[t * B:(t + 1) * B]

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One SGD step on the batch: zero_grad, the loss, backward, torch.optim.SGD's step."""
        self.opt.zero_grad(set_to_none=True)
        loss_fn(self.spec.loss, self.net(xb), yb).backward()
        self.opt.step()


def train_reference(spec: RunSpec, x_train, y_train, x_test, y_test, num_classes: int):
    """Train one run the plain way. Returns (net, history): history has, per epoch
    0..E, the eval-mode train/test loss and accuracy and the weight matrices."""
    run = ReferenceRun(spec, x_train, y_train, num_classes)
    history = [evaluate_reference(run.net, spec, x_train, y_train, x_test, y_test)]
    for epoch in range(spec.epochs):
        run.start_epoch(epoch)
        for t in range(spec.steps_per_epoch(x_train.shape[0])):
            run.step(*run.batch(t))
        history.append(evaluate_reference(run.net, spec, x_train, y_train, x_test, y_test))
    return run.net, history


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
