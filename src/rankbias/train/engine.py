"""The batched engine: a pack of K runs trained as ONE model.

Every parameter is stacked over the K members, [K, ...]. One training step is:
gather K mini-batches, one batched forward/backward, and three passes of SGD
with momentum and coupled weight decay, with each member's own lr, weight decay
and momentum as [K, 1, ...] columns. The members share a batch size B (a pack key)
but each draws its own data order; an epoch's last partial batch (n mod B samples,
kept unless drop_last) is one narrower step, so every step is a plain batch of equal
rows for every member, with no padding to mask.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from rankbias.store import metrics as M
from rankbias.train import models
from rankbias.train.batched import BatchContext, Conv2d, StepInputs, batched, matrix_layer
from rankbias.train.chain import Chain
from rankbias.plan.cluster import check_mem_mb, host_memory_mb
from rankbias.train.models import build_net, epoch_labels, epoch_order, loss_fn, weighted_loss, weighted_loss_and_grad
from rankbias.core.pack import PackSpec
from rankbias.core.spec import GRAPH_MODES, RunSpec

# Elements of a stacked [K, ...] tensor from which it has a storage block of its own;
# the smaller ones share one block (storage_blocks).
LARGE_TENSOR = 1 << 15
# How a step updates the parameters (Pack's `update`): "fused", one pass a member on the
# CPU (the default, fast); "torch", torch.optim.SGD's own operations in its own order,
# parameter by parameter, so that a pack on the CPU follows nn.Module + torch.optim.SGD
# bit for bit in float32 (peer checks; docs/engine.md, "Storage and update"); "columns",
# three ops a storage block with [K, 1] columns, what "fused" runs off the CPU (on the CPU:
# what the fused kernel is checked against).
UPDATE_MODES = ("fused", "torch", "columns")


def storage_blocks(shapes: list[tuple[int, ...]], K: int, dtype, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([K, n] blocks, a [K, *shape] view into them for each shape).

    Stacked tensors of fewer than LARGE_TENSOR elements share one block, member by
    member ([K, sum of their sizes]): the three-op update then scales all of them by a
    member's column in one op, rather than an op per tensor, which is what a small
    pack's update cost (a few hundred microseconds a step on a CPU). A larger tensor
    keeps a block of its own, contiguous, so that its batched matmuls read and write
    it at full speed (a weight gradient written into a strided [K, 100, 100] view took
    81 us against 46 us at K=16).
    """
    sizes = [math.prod(sh) for sh in shapes]
    small = [i for i, n in enumerate(sizes) if K * n < LARGE_TENSOR]
    blocks: list[torch.Tensor] = []
    views: list[torch.Tensor | None] = [None] * len(shapes)
    if small:
        shared = torch.empty(K, sum(sizes[i] for i in small), dtype=dtype, device=device)
        blocks.append(shared)
        at = 0
        for i in small:
            views[i] = shared[:, at:at + sizes[i]].view(K, *shapes[i])
            at += sizes[i]
    for i, n in enumerate(sizes):
        if K * n >= LARGE_TENSOR:
            own = torch.empty(K, n, dtype=dtype, device=device)
            blocks.append(own)
            views[i] = own.view(K, *shapes[i])
    assert all(v is not None for v in views)  # every tensor is in one block or the other
    return blocks, [v for v in views if v is not None]


def device_memory(device) -> tuple[int, str]:
    """(MiB, what they are) of the memory a pack on `device` lives in: a CUDA device's
    own, else the host's (cluster.host_memory_mb)."""
    device = torch.device(device)
    if device.type == "cuda":
        mb = torch.cuda.get_device_properties(device).total_memory // 2**20
        return mb, f"the memory of {device} ({torch.cuda.get_device_name(device)}, {mb} MiB)"
    mb = host_memory_mb()
    return mb, f"the host's memory ({mb} MiB)"


def check_pack_memory(specs: Sequence[RunSpec], device, memory_mb: int | None = None) -> None:
    """The pack fits `memory_mb` (the config's and `rankbias train`'s device_memory_mb),
    else the memory of the device it trains on, by cluster.estimate_mem_mb, as `rankbias
    plan` checks it: SpecError naming the pack and the numbers. Run before anything of
    the pack is allocated."""
    if memory_mb is None:
        memory_mb, limit = device_memory(device)
    else:
        limit = f"device_memory_mb = {memory_mb}"
    check_mem_mb(specs, memory_mb, limit, "use a smaller model or fewer runs in the pack, or, where the "
                 "device has more memory, give it as `rankbias train --device-memory-mb`")


class Pack:
    """K networks of one architecture, their optimiser state and their data."""

    def __init__(self, specs: Sequence[RunSpec], x_train, y_train, num_classes: int, device,
                 graph: str = "auto", memory_mb: int | None = None, update: str = "fused",
                 differentiation: str = "auto"):
        """`memory_mb`: the memory the pack must fit (default: the device's own;
        check_pack_memory), checked before anything is allocated. `update`: one of
        UPDATE_MODES (the update methods below step). `differentiation`: "auto" (by hand
        where the network is a chain, rankbias.train.chain; autograd elsewhere) or
        "autograd" (always; what the chain is checked against)."""
        if differentiation not in ("auto", "autograd"):
            raise ValueError(f"differentiation: {differentiation!r} is not one of auto, autograd")
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph: {graph!r} is not one of {', '.join(GRAPH_MODES)}")
        if update not in UPDATE_MODES:
            raise ValueError(f"update: {update!r} is not one of {', '.join(UPDATE_MODES)}")
        if update == "torch" and torch.device(device).type != "cpu":
            raise ValueError(f"update 'torch' (torch.optim.SGD's operation order, for peer checks) "
                             f"runs on the CPU only; this pack is on {device}")
        self.update = update
        self.graph, self._stepper, self.step_mode = graph, None, None
        self.specs = PackSpec.of(specs, "Pack")
        check_pack_memory(self.specs, device, memory_mb)
        self.K, self.device = len(self.specs), torch.device(device)
        self.loss = self.specs.loss
        self.X, self.Y, self.num_classes = x_train, y_train, num_classes
        self.n = x_train.shape[0]
        self.specs.check_batches(self.n)

        # Stack the members' seed-determined initialisations (the reference's exactly),
        # each parameter a view into the pack's storage blocks (`storage_blocks`), as
        # are its gradient and its momentum buffer.
        nets = [build_net(s, x_train.shape[1], num_classes) for s in self.specs]
        names = [n for n, _ in nets[0].named_parameters()]
        shapes = [tuple(p.shape) for _, p in nets[0].named_parameters()]
        blocks = [storage_blocks(shapes, self.K, x_train.dtype, self.device) for _ in range(3)]
        (self._pblocks, pviews), (self._gblocks, self.grads), (self._bblocks, self.bufs) = blocks
        for v in self.bufs:
            v.zero_()
        with torch.no_grad():
            for name, v in zip(names, pviews):
                v.copy_(torch.stack([dict(net.named_parameters())[name].detach() for net in nets]))
        self.params: dict[str, torch.Tensor] = {name: v.requires_grad_(True) for name, v in zip(names, pviews)}
        self.plist = list(self.params.values())
        # each member's slices of the blocks for the CPU's fused update (_fused_update);
        # a member without momentum keeps no buffer (torch's kernel asks for none)
        self._fused = [([p[k] for p in self._pblocks], [g[k] for g in self._gblocks],
                        [b[k] for b in self._bblocks] if s.momentum else [], s.weight_decay, s.momentum)
                       for k, s in enumerate(self.specs)] if self.device.type == "cpu" and update == "fused" else []
        # update "torch": each member's (parameter, gradient, buffer) views, parameter by
        # parameter as torch.optim.SGD sees them, and whether the buffers hold a step yet
        self._members = [[(p[k], g[k], b[k]) for p, g, b in zip(pviews, self.grads, self.bufs)]
                         for k in range(self.K)] if update == "torch" else []
        self._bufs_started = False
        buffers = [dict(net.named_buffers()) for net in nets]
        self.running = {name: torch.stack([b[name] for b in buffers]).to(self.device, x_train.dtype)
                        for name in buffers[0] if not name.endswith("num_batches_tracked")}
        # the same network, its layers computing every member at once
        self.ctx = BatchContext(self.K)
        self.model = batched(nets[0], self.params, self.running, self.ctx)
        self.matrices = [(name, kind) for name, kind, _ in models.matrix_paths(nets[0])]
        self._matrix_layers = {name: matrix_layer(self.model, path)
                               for name, _, path in models.matrix_paths(nets[0])}
        # the hand-differentiated step where the network is a chain (rankbias.train.chain)
        self.chain, why = Chain.of(self.model, self.ctx, {id(p): g for p, g in zip(self.plist, self.grads)})
        if differentiation == "autograd":
            self.chain, why = None, "asked for"
        self.differentiation = "by hand (chain)" if self.chain is not None else f"autograd ({why})"
        # the step's two choices, made here once (step)
        self._forward_backward = self._chain_grads if self.chain is not None else self._autograd_grads
        self._update = {"torch": self._torch_update, "columns": self._block_update,
                        "fused": self._fused_update if self.device.type == "cpu" else self._block_update}[update]
        self.activation_size = self.specs.layer_table().largest
        # Every convolution also as the linear operator it is on its input (rank.conv:
        # operator): (stored name, its batched layer, input size).
        self.operators: list[tuple[str, Conv2d, tuple[int, int]]] = []
        for layer in self.specs.layer_table().layers:
            if layer.kind == "conv":
                conv = self._matrix_layers[layer.name]
                # a convolution's batched form is a Conv2d, and its layer records its input size
                assert isinstance(conv, Conv2d) and layer.input_size is not None
                self.operators.append((f"{layer.name}:operator", conv, layer.input_size))

        self.dtype = self.plist[0].dtype

        def col(v):
            return torch.tensor(v, dtype=self.dtype, device=self.device).view(self.K, 1)

        self.wd = col([s.weight_decay for s in self.specs])
        self.mom = col([s.momentum for s in self.specs])
        self.batch = self.specs.batch_size
        self.alive = torch.ones(self.K, 1, dtype=self.dtype, device=self.device)
        self.loss_sum = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        self.steps_per_epoch = self.specs.steps_per_epoch(self.n)

    def weight(self, matrix: str) -> torch.Tensor:
        """[K, out, in]: every member's matrix (a kernel reshaped, a weight-normed weight)."""
        return self._matrix_layers[matrix].matrix()

    @torch.no_grad()
    def operator_spectra(self) -> dict[str, torch.Tensor]:
        """Every member's singular values of each convolution's operator, [K, n] by name."""
        return {name: M.conv_operator_singular_values(conv.w, hw, conv.stride[0])
                for name, conv, hw in self.operators}

    def forward(self, x, train: bool = False):
        self.ctx.train = train
        return self.model(x)

    # -- one SGD step, the whole of it -------------------------------------------
    def step(self, s: "StepInputs") -> None:
        """Gather the members' batches, forward and gradients (into self.grads), update.
        Which differentiation and which update is chosen once, when the pack is built."""
        rows = s.idx.reshape(-1)
        xb = torch.index_select(self.X, 0, rows).view(*s.idx.shape, -1)  # [K, B, D]
        self.ctx.train = True
        weighted = self._forward_backward(xb, s)
        with torch.no_grad():
            self._update(s)
            self.loss_sum.add_(weighted.detach())

    # the differentiations: each writes every gradient into self.grads and returns the
    # members' weighted losses [K]
    def _chain_grads(self, xb: torch.Tensor, s: "StepInputs") -> torch.Tensor:
        """By hand, where the network is a chain (rankbias.train.chain)."""
        assert self.chain is not None
        logits, saved = self.chain.forward(xb)
        weighted, g = weighted_loss_and_grad(self.loss, logits, s.y, s.weight.view(-1))
        self.chain.backward(g, saved)
        return weighted

    def _autograd_grads(self, xb: torch.Tensor, s: "StepInputs") -> torch.Tensor:
        weighted = weighted_loss(self.loss, self.model(xb), s.y, s.weight.view(-1))
        weighted.sum().backward()
        grads = [p.grad for p in self.plist if p.grad is not None]
        if len(grads) != len(self.plist):
            raise RuntimeError("SGD step: a parameter got no gradient from the backward pass")
        torch._foreach_copy_(self.grads, grads)
        for p in self.plist:
            p.grad = None
        return weighted

    # the updates (UPDATE_MODES): torch.optim.SGD's (momentum, coupled weight decay) on
    # the storage blocks, which keep their storage (a captured CUDA graph relies on that).
    # A frozen member has zero weights and gradients and lr 0, so it stays as it is.
    def _fused_update(self, s: "StepInputs") -> None:
        """On the CPU: torch's fused SGD kernel, one call a member over its slices of the
        blocks: a single pass that reads p, g and buf and writes p and buf (5 streams), 2x
        faster than three ops at K=16 (docs/engine.md, "Storage and update"). Its weight
        decay and momentum are the member's own numbers, its lr the step's column entry (a
        tensor: nothing is read back)."""
        lr = torch.neg(s.neg_lr)
        for k, (p, g, b, wd, mom) in enumerate(self._fused):
            torch._fused_sgd_(p, g, b, weight_decay=wd, momentum=mom, lr=lr[k], dampening=0.0,
                              nesterov=False, maximize=False, is_first_step=False)

    def _block_update(self, s: "StepInputs") -> None:
        """Off the CPU, and update "columns": three ops a block with [K, 1] columns: g += wd p; buf = g + mom
        buf (one multiply-add into its own storage); p -= lr buf (9 streams)."""
        for pb, gb, bb in zip(self._pblocks, self._gblocks, self._bblocks):
            gb.addcmul_(pb, s.wd)
            torch.addcmul(gb, bb, s.mom, out=bb)
            pb.addcmul_(bb, s.neg_lr)

    def _torch_update(self, s: "StepInputs") -> None:
        """Update "torch" (CPU): torch.optim.SGD's for-loop (_single_tensor_sgd), parameter
        by parameter and member by member, with the same Python numbers: d = g + wd p
        (skipped at wd 0); buf = d at the first step, else buf = mom buf, then buf += d
        (two roundings); p += -lr buf. The fused kernel rounds differently
        (docs/engine.md, "Storage and update")."""
        neg_lr = s.neg_lr.view(-1).tolist()
        for k, spec in enumerate(self.specs):
            wd, mom = spec.weight_decay, spec.momentum
            for param, grad, buf in self._members[k]:
                d = grad.add_(param, alpha=wd) if wd != 0 else grad
                if mom != 0:
                    if self._bufs_started:
                        buf.mul_(mom).add_(d)
                    else:
                        buf.copy_(d)
                    d = buf
                param.add_(d, alpha=neg_lr[k])
        self._bufs_started = True

    # -- an epoch --------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> "EpochPlan":
        return EpochPlan(self, epoch)

    def train_epoch(self, epoch: int) -> None:
        self.loss_sum.zero_()
        plan = self.epoch_plan(epoch)
        step = self.stepper(plan)
        if isinstance(step, StaticStep):
            step.run(plan)
        else:
            for t in range(plan.steps):
                step(plan.inputs(t))

    def stepper(self, plan: "EpochPlan"):
        """The step function to use: `Pack.step`, or on CUDA its captured graph where
        that was checked to give the same update and measured to be faster."""
        if self._stepper is None:
            self._stepper, self.step_mode = choose_stepper(self, plan, self.graph)
        return self._stepper

    # -- state, as the tensors one step reads and writes ------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        return [*self.plist, *self.bufs, *self.running.values(), self.loss_sum]

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self._state_tensors()]

    @torch.no_grad()
    def restore(self, snap: list[torch.Tensor]) -> None:
        for t, v in zip(self._state_tensors(), snap):
            t.copy_(v)
        for p in self.plist:     # a step cut short (a failed capture) may have left grads
            p.grad = None

    def epoch_loss(self) -> torch.Tensor:
        """Mean training mini-batch loss of each member over the last epoch."""
        return self.loss_sum / self.steps_per_epoch

    @torch.no_grad()
    def finite(self) -> torch.Tensor:
        """[K] bool: every parameter of the member is finite."""
        ok = torch.ones(self.K, dtype=torch.bool, device=self.device)
        for p in self.plist:
            ok &= torch.isfinite(p).view(self.K, -1).all(1)
        return ok

    def freeze(self, k: int) -> None:
        """Take a diverged member out: zero weights, no further updates."""
        with torch.no_grad():
            self.alive[k] = 0
            for p, b in zip(self.plist, self.bufs):
                p[k] = 0
                b[k] = 0
            for name, t in self.running.items():
                t[k] = 1 if name.endswith("running_var") else 0

    # -- evaluation --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x, y, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode (running BN statistics) mean loss and accuracy of each member."""
        chunk = chunk or max(256, (1 << 24) // (self.K * max(self.activation_size, x.shape[1] // 4)))
        loss = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        correct = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        for i in range(0, x.shape[0], chunk):
            xc, yc = x[i:i + chunk], y[i:i + chunk]
            logits = self.forward(xc, train=False)                      # [K, n, C]
            per = loss_fn(self.loss, logits.flatten(0, 1), yc.repeat(self.K), "none").view(self.K, -1)
            loss += per.double().sum(1)
            correct += (logits.argmax(-1) == yc).double().sum(1)
        return loss / x.shape[0], correct / x.shape[0]

    # -- checkpoint state ----------------------------------------------------------
    def state(self) -> dict:
        return {"params": {n: p.detach().cpu() for n, p in self.params.items()},
                "bufs": [b.cpu() for b in self.bufs], "alive": self.alive.cpu(),
                "running": {k: v.cpu() for k, v in self.running.items()}}

    @torch.no_grad()
    def load_state(self, st: dict) -> None:
        for n, p in self.params.items():
            p.copy_(st["params"][n])
        for b, v in zip(self.bufs, st["bufs"]):
            b.copy_(v)
        self._bufs_started = True      # a checkpoint holds at least one epoch's steps
        self.alive.copy_(st["alive"])
        for k, v in st["running"].items():
            self.running[k].copy_(v)


class EpochPlan:
    """Every member's mini-batches for one epoch: `full_steps` batches of B samples,
    [K, full_steps, B], then, unless drop_last, the n mod B samples left over as one
    last step, [K, n mod B]: the batches of a DataLoader(batch_size=B, drop_last=...)
    over each member's own permutation (`epoch_order`). All members share n and B, so
    their last batches are equally long. The labels of those batches come with them
    (`epoch_labels`): the true ones, or with label noise, each member's own draws.
    """

    def __init__(self, pack: Pack, epoch: int):
        K, n, B, dev = pack.K, pack.n, pack.batch, pack.device
        self.steps, self.full_steps = pack.steps_per_epoch, n // B
        lr = torch.tensor([s.lr_at(epoch) for s in pack.specs], dtype=pack.dtype, device=dev).view(K, 1)
        lr = lr * pack.alive
        order = torch.stack([epoch_order(s, epoch, n) for s in pack.specs])
        cut = self.full_steps * B
        self.idx = order[:, :cut].reshape(K, self.full_steps, B).to(dev)
        self.last_idx = order[:, cut:].contiguous().to(dev) if self.steps > self.full_steps else None
        true = pack.Y[order.to(pack.Y.device)]                                   # [K, n]
        labels = torch.stack([epoch_labels(s, epoch, true[k], pack.num_classes)
                              for k, s in enumerate(pack.specs)])
        self.y = labels[:, :cut].reshape(K, self.full_steps, B).to(dev)
        self.last_y = labels[:, cut:].contiguous().to(dev) if self.steps > self.full_steps else None
        self.common = dict(weight=pack.alive, neg_lr=-lr, wd=pack.wd * pack.alive, mom=pack.mom)
        self.per_step = ("idx", "y")       # the rest holds for the whole epoch

    def inputs(self, t: int) -> StepInputs:
        full = t < self.full_steps
        return StepInputs(idx=self.idx[:, t] if full else self.last_idx,
                          y=self.y[:, t] if full else self.last_y, **self.common)


# -- CUDA graphs ---------------------------------------------------------------------
# A step of a small pack is hundreds of tiny kernels; on a GPU their launches, not the
# arithmetic, set the pace. Capturing `Pack.step` once in a CUDA graph and replaying it
# launches them all at once. The step is written to allow that: it reads its inputs
# from tensors (never Python numbers that change), allocates nothing that outlives it,
# and never reads a value back to the host (tests/test_graphs.py checks the last on
# the CPU, op by op).

class StaticStep:
    """`Pack.step` over static input buffers: calling it copies a step's inputs into
    those buffers and steps the pack on them. This is the buffer handling a CUDA graph
    relies on (a graph reads the same addresses every replay); on its own it runs
    eagerly, so the CPU tests can check that handling where no graph can be captured."""

    captures = False

    def __init__(self, pack: Pack, example: StepInputs):
        self.pack = pack
        self.static = StepInputs(**{f: getattr(example, f).clone() for f in StepInputs.__slots__})

    def __call__(self, s: StepInputs) -> None:
        self._refresh(s, StepInputs.__slots__)

    def run(self, plan: "EpochPlan") -> None:
        """A whole epoch: every input is copied for its first step, then only those
        that change from step to step (`plan.per_step`). The buffers hold B-row steps;
        the partial last batch, narrower, runs eagerly as `Pack.step`."""
        self(plan.inputs(0))
        for t in range(1, plan.full_steps):
            self._refresh(plan.inputs(t), plan.per_step)
        if plan.steps > plan.full_steps:
            self.pack.step(plan.inputs(plan.full_steps))

    def _refresh(self, s: StepInputs, fields) -> None:
        for f in fields:
            getattr(self.static, f).copy_(getattr(s, f))
        self._launch()

    def _launch(self) -> None:
        self.pack.step(self.static)


class GraphedStep(StaticStep):
    """`Pack.step` captured in a CUDA graph over the static buffers: each call replays it."""

    captures = True

    def __init__(self, pack: Pack, example: StepInputs, warmup: int = 3):
        super().__init__(pack, example)
        dev = pack.device
        snap = pack.snapshot()
        # Warm-up on a side stream, as torch.cuda.graphs asks: it initialises autograd's
        # and cuBLAS's per-stream state. The warm-up steps train, so the state is put back.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                pack.step(self.static)
        torch.cuda.current_stream(dev).wait_stream(side)
        pack.restore(snap)
        del snap
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):      # records the kernels, runs none of them
            pack.step(self.static)

    def _launch(self) -> None:
        self.graph.replay()


def _steps_agree(pack: Pack, step_a, step_b, plan: "EpochPlan", steps: int, rtol: float = 1e-3) -> bool:
    """Do two step functions move the pack the same way over `steps` steps from here?

    The updates (state after minus state before) are compared member by member, each
    to rtol of that member's largest entry, so a replay that read stale inputs fails
    even after one step, and a slow member is not hidden by a fast one. A member that
    diverges must diverge alike in both; if nothing stayed finite, nothing was shown.
    The pack's state is left as it was found.
    """
    snap = pack.snapshot()
    try:
        after = []
        for fn in (step_a, step_b):
            pack.restore(snap)
            for t in range(1, steps + 1):          # not step 0: the captured example
                fn(plan.inputs(t % plan.full_steps))
            after.append(pack.snapshot())
        ok = torch.ones((), dtype=torch.bool, device=snap[0].device)
        seen = torch.zeros((), dtype=torch.bool, device=snap[0].device)
        for s0, a, b in zip(snap, *after):
            da, db = (a - s0).double().view(pack.K, -1), (b - s0).double().view(pack.K, -1)
            fa, fb = torch.isfinite(da), torch.isfinite(db)
            da, db = torch.where(fa, da, 0.0), torch.where(fb, db, 0.0)
            ok &= (fa == fb).all() & ((da - db).abs().amax(1) <= rtol * da.abs().amax(1)).all()
            seen |= (da != 0).any()
        return bool(ok & seen)
    finally:
        pack.restore(snap)


def _ms_per_step(pack: Pack, fn, plan: "EpochPlan", steps: int) -> float:
    snap = pack.snapshot()
    try:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for t in range(steps):
            fn(plan.inputs(t % plan.full_steps))
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    finally:
        pack.restore(snap)


def choose_stepper(pack: Pack, plan: "EpochPlan", mode: str, check_steps: int = 2,
                   time_steps: int = 20, stepper: type[StaticStep] = GraphedStep):
    """(step function, description) for `pack` under graph mode auto|on|off.

    "auto" on CUDA captures the step, checks that replaying it moves the pack exactly
    as `Pack.step` does, times both, and keeps the faster; any failure falls back to
    `Pack.step` and says why. "on" insists on the graph (an error if it cannot be
    had); "off" and the CPU use `Pack.step`. The pack's state is left as it was found.
    `stepper=StaticStep` goes through the same choice with the static buffers and no
    graph (where no CUDA device is, as in the CPU tests).
    """
    if mode == "off":
        return pack.step, "eager"
    capture = stepper.captures
    if capture and pack.device.type != "cuda":
        if mode == "on":
            raise RuntimeError(f"--graph on: CUDA graphs need a CUDA device; this pack is on {pack.device}")
        return pack.step, "eager"
    if mode == "auto" and plan.full_steps <= check_steps:
        # the check needs steps whose inputs differ from the captured one; with so few
        # steps an epoch, a graph would save next to nothing anyway
        return pack.step, f"eager ({plan.full_steps} full step(s) an epoch: too few to check a graph on)"
    device = torch.cuda.device(pack.device) if capture else contextlib.nullcontext()
    snap = pack.snapshot()
    with device:     # capture and timing use the current device's streams: the pack's
        stream = torch.cuda.current_stream() if capture else None
        try:
            graphed = stepper(pack, plan.inputs(0))
            agree = _steps_agree(pack, pack.step, graphed, plan, check_steps)
            if agree and mode == "auto" and capture:
                eager_ms = _ms_per_step(pack, pack.step, plan, time_steps)
                graph_ms = _ms_per_step(pack, graphed, plan, time_steps)
        except Exception as e:  # noqa: BLE001 - any failure of capture, check or timing: run eagerly
            if stream is not None:   # a capture that failed may not have switched back
                torch.cuda.set_stream(stream)
            if mode == "on":
                raise RuntimeError(f"--graph on: capturing the step failed: {type(e).__name__}: {e}") from e
            return pack.step, f"eager (graph capture failed: {type(e).__name__}: {e})"
        finally:
            pack.restore(snap)
    if not agree:
        if mode == "on":
            raise RuntimeError("--graph on: the captured step does not reproduce Pack.step's update")
        return pack.step, "eager (the captured step did not reproduce Pack.step's update)"
    if mode == "on" or not capture:
        return graphed, "cuda-graph" if capture else "static-buffers"
    timing = f"eager {eager_ms:.3f} ms/step, graph {graph_ms:.3f} ms/step"
    if graph_ms < eager_ms:
        return graphed, f"cuda-graph ({timing})"
    return pack.step, f"eager ({timing})"
