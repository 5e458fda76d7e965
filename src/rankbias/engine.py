"""The batched engine: a pack of K runs trained as ONE model.

Every parameter is stacked over the K members, [K, ...]. One training step is:
gather K mini-batches, one batched forward/backward, and four foreach ops for SGD
with momentum and coupled weight decay, with each member's own lr, weight decay
and momentum as [K, 1, ...] columns. Members with
different batch sizes share a step by padding to the largest batch and masking;
a member that has finished its epoch sits out (lr 0, momentum 1, loss weight 0,
which leaves its parameters, momentum and BatchNorm statistics exactly unchanged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import build_net, epoch_order, loss_fn
from .spec import RunSpec

BN_EPS = 1e-5
BN_MOMENTUM = 0.1



class Pack:
    """K networks of one architecture, their optimiser state and their data."""

    def __init__(self, specs: list[RunSpec], x_train, y_train, num_classes: int, device):
        s0 = specs[0]
        if any(s.pack_key() != s0.pack_key() for s in specs):
            raise ValueError("runs of a pack must share dataset, architecture, loss, epochs, "
                             "schedule, log_every and subsets")
        self.specs, self.K, self.device = specs, len(specs), torch.device(device)
        self.arch, self.depth, self.loss = s0.arch, s0.depth, s0.loss
        self.bn = s0.arch.endswith("_bn")
        self.X, self.Y, self.num_classes = x_train, y_train, num_classes
        self.n = x_train.shape[0]
        for s in specs:
            if s.batch_size > self.n:
                raise ValueError(f"batch_size: {s.batch_size} exceeds the {self.n} training samples")

        # Stack the members' seed-determined initialisations (the reference's exactly).
        nets = [build_net(s, x_train.shape[1], num_classes) for s in specs]
        self.names = [n for n, _ in nets[0].named_parameters()]
        self.params: dict[str, torch.Tensor] = {
            name: torch.stack([dict(net.named_parameters())[name].detach() for net in nets])
            .to(self.device, x_train.dtype).requires_grad_(True) for name in self.names}
        self.plist = list(self.params.values())
        self.bufs = [torch.zeros_like(p) for p in self.plist]
        # [K, 1, ...] shapes that broadcast a per-member column over each parameter.
        self.col_shapes = [(self.K,) + (1,) * (p.dim() - 1) for p in self.plist]
        buffers = [dict(net.named_buffers()) for net in nets]
        self.running = {name: torch.stack([b[name] for b in buffers]).to(self.device, x_train.dtype)
                        for name in buffers[0] if not name.endswith("num_batches_tracked")}
        self.matrices = [(name, kind) for name, kind, _ in nets[0].matrices()]
        self.matrix_params = {name: self._matrix_key(name) for name, _ in self.matrices}

        self.dtype = self.plist[0].dtype
        col = lambda v: torch.tensor(v, dtype=self.dtype, device=self.device).view(self.K, 1)
        self.wd = col([s.weight_decay for s in specs])
        self.mom = col([s.momentum for s in specs])
        self.batch = [s.batch_size for s in specs]
        self.mixed = len(set(self.batch)) > 1
        self.alive = torch.ones(self.K, 1, dtype=self.dtype, device=self.device)
        self.loss_sum = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        # steps each member takes per epoch (n // B, like a DataLoader with drop_last)
        self.member_steps = torch.tensor([self.n // b for b in self.batch], dtype=torch.float64,
                                         device=self.device)

    @staticmethod
    def _matrix_key(name: str) -> str:
        if name.startswith("fc"):
            return f"hidden.{name}.weight"
        if name.startswith("block"):
            return f"blocks.{name}.weight"
        return f"{name}.weight"

    def weight(self, matrix: str) -> torch.Tensor:
        return self.params[self.matrix_params[matrix]]

    # -- the model -------------------------------------------------------------
    def _linear(self, name, x):
        w, b = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
        if x.dim() == 2:  # evaluation: one input batch shared by every member
            return torch.matmul(x, w.transpose(1, 2)) + b.unsqueeze(1)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    def _bn(self, name, x, train, step):
        if not self.bn:
            return x
        w, b = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
        rm, rv = self.running[f"{name}.running_mean"], self.running[f"{name}.running_var"]
        if not train:
            return (x - rm.unsqueeze(1)) * torch.rsqrt(rv.unsqueeze(1) + BN_EPS) * w.unsqueeze(1) + b.unsqueeze(1)
        if step.mask is None:
            mean = x.mean(1, keepdim=True)
            var = x.var(1, unbiased=False, keepdim=True)
        else:  # each member's statistics over its own rows only
            mean = (x * step.mask).sum(1, keepdim=True) / step.count
            var = ((x - mean) * step.mask).pow(2).sum(1, keepdim=True) / step.count
        with torch.no_grad():
            m = step.bn_momentum
            rm.mul_(1 - m).add_(m * mean.squeeze(1))
            rv.mul_(1 - m).add_(m * var.squeeze(1) * step.unbias)
        return (x - mean) * torch.rsqrt(var + BN_EPS) * w.unsqueeze(1) + b.unsqueeze(1)

    def forward(self, x, train: bool = False, step: "StepInputs | None" = None):
        if self.arch.startswith("mlp"):
            for i in range(1, self.depth + 1):
                x = F.relu(self._bn(f"hidden.bn{i}", self._linear(f"hidden.fc{i}", x), train, step))
        else:
            x = self._bn("stem_bn", self._linear("stem", x), train, step)
            for i in range(1, self.depth + 1):
                p = f"blocks.block{i}"
                h = F.relu(self._bn(f"{p}.bn1", self._linear(f"{p}.w1", x), train, step))
                x = x + F.relu(self._bn(f"{p}.bn2", self._linear(f"{p}.w2", h), train, step))
        return self._linear("out", x)

    # -- one SGD step, the whole of it -------------------------------------------
    def cols(self, c: torch.Tensor) -> list[torch.Tensor]:
        """A [K, 1] column as views that broadcast over each parameter."""
        return [c.view(shape) for shape in self.col_shapes]

    def step(self, s: "StepInputs") -> None:
        xb, yb = self.X[s.idx], self.Y[s.idx]                         # [K, B, D], [K, B]
        logits = self.forward(xb, train=True, step=s)
        per_sample = loss_fn(self.loss, logits.flatten(0, 1), yb.flatten(), "none").view(self.K, -1)
        if s.mask is None:
            member_loss = per_sample.mean(1)
        else:
            member_loss = (per_sample * s.mask.squeeze(-1)).sum(1) / s.count.view(-1)
        (member_loss * s.weight.view(-1)).sum().backward()
        grads = [p.grad for p in self.plist]
        with torch.no_grad():                                           # == torch.optim.SGD
            torch._foreach_addcmul_(grads, self.plist, s.wd)            # g += wd * p
            torch._foreach_mul_(self.bufs, s.mom)                       # buf = mom * buf + g
            torch._foreach_add_(self.bufs, grads)
            torch._foreach_addcmul_(self.plist, self.bufs, s.neg_lr)    # p -= lr * buf
            for p in self.plist:
                p.grad = None
            self.loss_sum.add_(member_loss.detach() * s.weight.view(-1))

    # -- an epoch --------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> "EpochPlan":
        return EpochPlan(self, epoch)

    def train_epoch(self, epoch: int) -> None:
        self.loss_sum.zero_()
        plan = self.epoch_plan(epoch)
        for t in range(plan.steps):
            self.step(plan.inputs(t))

    def epoch_loss(self) -> torch.Tensor:
        """Mean training mini-batch loss of each member over the last epoch."""
        return self.loss_sum / self.member_steps

    @torch.no_grad()
    def finite(self) -> torch.Tensor:
        """[K] bool: every parameter of the member is finite."""
        ok = torch.ones(self.K, dtype=torch.bool, device=self.device)
        for p in self.plist:
            ok &= torch.isfinite(p).flatten(1).all(1)
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
        width = max(p.shape[1] for n, p in self.params.items() if n.endswith("weight") and p.dim() == 3)
        chunk = chunk or max(256, (1 << 24) // (self.K * max(width, x.shape[1] // 4)))
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
        self.alive.copy_(st["alive"])
        for k, v in st["running"].items():
            self.running[k].copy_(v)


class StepInputs:
    """What one step needs besides the pack: indices, masks and hyperparameter columns."""
    __slots__ = ("idx", "mask", "count", "weight", "neg_lr", "wd", "mom", "bn_momentum", "unbias")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class EpochPlan:
    """Every member's mini-batches for one epoch, laid out as [K, steps, B_max].

    Each member draws its own permutation (`epoch_order`) and, like a DataLoader with
    drop_last, takes n // B full batches of its own size B.
    """

    def __init__(self, pack: Pack, epoch: int):
        K, n, dev = pack.K, pack.n, pack.device
        B = pack.batch
        self.bmax = max(B)
        member_steps = [n // b for b in B]
        self.steps = max(member_steps)
        lr = torch.tensor([s.lr_at(epoch) for s in pack.specs], dtype=pack.dtype, device=dev).view(K, 1)
        lr = lr * pack.alive
        if not pack.mixed:
            order = torch.stack([epoch_order(s, epoch, n)[: self.steps * self.bmax] for s in pack.specs])
            self.idx = order.view(K, self.steps, self.bmax).to(dev)
            b = self.bmax
            self.common = dict(mask=None, count=None, weight=pack.alive, neg_lr=pack.cols(-lr),
                               wd=pack.cols(pack.wd * pack.alive), mom=pack.cols(pack.mom),
                               bn_momentum=BN_MOMENTUM, unbias=b / (b - 1) if b > 1 else 1.0)
            self.active = None
            return
        idx = torch.zeros(K, self.steps, self.bmax, dtype=torch.long)
        active = torch.zeros(K, self.steps, 1, dtype=pack.dtype)
        for k, s in enumerate(pack.specs):
            b, st = B[k], member_steps[k]
            order = epoch_order(s, epoch, n)[: st * b].view(st, b)
            idx[k, :st, :b] = order
            idx[k, :st, b:] = order[:, :1]          # padding rows, masked out
            idx[k, st:] = idx[k, 0]                 # sits out: any valid rows, weight 0
            active[k, :st] = 1
        self.idx = idx.to(dev)
        self.active = active.to(dev) * pack.alive.unsqueeze(1)     # [K, steps, 1]
        rows = torch.arange(self.bmax).view(1, -1)
        bt = torch.tensor(B).view(K, 1)
        self.mask = (rows < bt).to(pack.dtype).view(K, self.bmax, 1).to(dev)
        self.count = bt.to(pack.dtype).view(K, 1, 1).to(dev)
        self.unbias = (bt.double() / (bt - 1).clamp_min(1)).to(pack.dtype).view(K, 1).to(dev)
        self.pack, self.lr, self.wd, self.mom = pack, lr, pack.wd, pack.mom

    def inputs(self, t: int) -> StepInputs:
        if self.active is None:
            return StepInputs(idx=self.idx[:, t], **self.common)
        a = self.active[:, t]                                          # [K, 1]
        cols = self.pack.cols
        return StepInputs(idx=self.idx[:, t], mask=self.mask, count=self.count, weight=a,
                          neg_lr=cols(-self.lr * a), wd=cols(self.wd * a),
                          mom=cols(torch.where(a > 0, self.mom, 1.0)),
                          bn_momentum=BN_MOMENTUM * a, unbias=self.unbias)

