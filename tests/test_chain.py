"""The hand-differentiated step (rankbias.train.chain) against autograd's, and the storage
blocks the SGD update runs on. (Both steps are held to torch.optim.SGD on the plain
modules in test_engine.py and test_models.py.)"""
import pytest
import torch
from torch import nn

from rankbias.train.batched import BatchContext, batched
from rankbias.train.chain import Chain
from rankbias.train.engine import LARGE_TENSOR, Pack
from rankbias.core.spec import RunSpec


def _specs(model, batch=100, loss="ce", activation="relu", k=3):
    base = dict(dataset="synthetic", model=model, epochs=2, log_every=1, batch_size=batch, loss=loss,
                activation=activation)
    return [RunSpec.from_dict({**base, "lr": 0.05 * (i + 1), "weight_decay": 5e-4 * i,
                               "momentum": 0.9 - 0.2 * i, "seed": i}) for i in range(k)]


def _state(pack):
    return [t.clone() for t in pack.snapshot()]


@pytest.mark.parametrize("model,activation", [("MLP-BN-3-16", "relu"), ("MLP-2-16", "relu"),
                                              ("RES-BN-2-16", "relu"), ("RES-2-16", "leaky_relu"),
                                              ("MLP-BN-2-16", "leaky_relu")])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_the_chain_step_equals_autograds_bitwise(model, activation, loss, synthetic64):
    """The chain runs the kernels autograd runs for the same layers (the forward's
    own, bmm, native_batch_norm_backward, threshold/leaky_relu_backward), so over an
    epoch and a half (partial last batches included) both steps leave every parameter,
    buffer, BatchNorm statistic and loss sum bit for bit equal."""
    ds = synthetic64
    specs = _specs(model, loss=loss, activation=activation)
    hand = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, "cpu")
    auto = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, "cpu", differentiation="autograd")
    assert hand.chain is not None and hand.differentiation == "by hand (chain)"
    assert auto.chain is None and auto.differentiation == "autograd (asked for)"
    for epoch in range(2):
        plan = hand.epoch_plan(epoch)
        for t in range(plan.steps if epoch == 0 else 3):
            hand.step(plan.inputs(t))
            auto.step(plan.inputs(t))
    moved = False
    for a, b, s0 in zip(_state(hand), _state(auto), Pack(specs, ds.x_train, ds.y_train,
                                                           ds.num_classes, "cpu").snapshot()):
        assert torch.equal(a, b)
        moved |= not torch.equal(a, s0)
    assert moved


@pytest.mark.parametrize("model,why", [("MLP-WN-2-16", "weight-normed Linear has no hand-written backward"),
                                       ("CONV-BN-2-8", "Unflatten has no hand-written backward")])
def test_networks_without_a_chain_step_with_autograd_and_say_why(model, why, synthetic64):
    ds = synthetic64
    pack = Pack(_specs(model), ds.x_train, ds.y_train, ds.num_classes, "cpu")
    assert pack.chain is None and why in pack.differentiation
    assert pack.differentiation.startswith("autograd (")
    before = _state(pack)
    pack.step(pack.epoch_plan(0).inputs(0))
    assert all(p.grad is None for p in pack.plist)
    assert not all(torch.equal(a, b) for a, b in zip(before, _state(pack)))


class _Shared(nn.Module):
    """One Linear called twice: its gradient is the sum of two, which the chain's
    writes into the gradient storage would not give."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc(self.act(self.fc(x)))


class _Branchy(nn.Module):
    """A forward with a torch function the chain has no backward for."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


@pytest.mark.parametrize("net,why", [(_Shared, "fc: called twice"), (_Branchy, "tanh has no hand-written backward")])
def test_a_network_the_chain_cannot_step_is_refused_by_name(net, why):
    module = net()
    ctx = BatchContext(2)
    params = {n: torch.stack([p.detach()] * 2).requires_grad_(True) for n, p in module.named_parameters()}
    model = batched(module, params, {}, ctx)
    chain, reason = Chain.of(model, ctx, {id(p): torch.empty_like(p) for p in params.values()})
    assert chain is None and why in reason


def test_parameters_gradients_and_buffers_live_in_the_storage_blocks(synthetic):
    """Small tensors share one member-major block, a large one has its own; each
    parameter, its gradient and its momentum buffer are views into their blocks, and
    one update leaves them there."""
    ds = synthetic
    pack = Pack(_specs("MLP-BN-2-100", batch=32), ds.x_train, ds.y_train, ds.num_classes, "cpu")
    large = [n for n, p in pack.params.items() if p.numel() >= LARGE_TENSOR]
    assert large == ["hidden.fc1.weight"] and len(pack._pblocks) == 2
    ptrs = [p.data_ptr() for p in pack.plist] + [g.data_ptr() for g in pack.grads] + \
        [b.data_ptr() for b in pack.bufs]
    before = [p.detach().clone() for p in pack.plist]
    pack.step(pack.epoch_plan(0).inputs(0))
    assert ptrs == [p.data_ptr() for p in pack.plist] + [g.data_ptr() for g in pack.grads] + \
        [b.data_ptr() for b in pack.bufs]
    for views, blocks in ((pack.plist, pack._pblocks), (pack.grads, pack._gblocks), (pack.bufs, pack._bblocks)):
        spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in blocks]
        for v in views:
            assert any(lo <= v.data_ptr() < hi for lo, hi in spans)
        assert sum(v.numel() for v in views) == sum(b.numel() for b in blocks)
    # after the first step the momentum buffer is the gradient written there plus the decay
    wd = torch.tensor([s.weight_decay for s in pack.specs])
    for p0, g, b in zip(before, pack.grads, pack.bufs):
        decayed = g + wd.view(-1, *[1] * (g.dim() - 1)) * p0
        torch.testing.assert_close(b, decayed, rtol=1e-6, atol=1e-9)
        assert b.abs().amax() > 0


def test_the_fused_cpu_update_equals_the_three_op_update(synthetic64):
    """The CPU's fused SGD kernel (one call a member) and the three-op update on
    [K, 1] columns (other devices) move the pack alike to float64 rounding, a member
    without momentum included; and the three ops are what a non-CPU step runs."""
    ds = synthetic64
    specs = _specs("MLP-BN-2-100", batch=100)
    specs[1] = RunSpec.from_dict({**specs[1].to_dict(), "momentum": 0.0})
    fused = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, "cpu")
    ops = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, "cpu", update="columns")
    assert len(fused._fused) == 3
    plan = fused.epoch_plan(0)
    for t in range(plan.steps):
        fused.step(plan.inputs(t))
        ops.step(plan.inputs(t))
    for a, b in zip(fused.plist, ops.plist):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for k, m in enumerate(s.momentum for s in specs):
        for a, b in zip(fused.bufs, ops.bufs):
            if m:
                torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
            else:   # torch keeps no buffer without momentum; the update is the gradient's
                assert not a[k].any()
