"""A training step differentiated by hand, for networks that are chains of batched
Linear layers, 1-d BatchNorm, elementwise activations and residual sums.

On a CPU a step of a small pack (width 100, B = 8..128, K = 1..6: the quick profile)
is a few hundred tiny kernels, and what costs is not their arithmetic but torch's
dispatch around them: autograd's graph (a node, a saved-tensor check and an
AccumulateGrad per parameter), Python autograd Functions and module calls. This
step runs the same kernels without any of that. The network is read once, by
tracing the batched model's own forward (`torch.fx`), so no architecture is written
twice: the MLP and residual families (and any user model of the same parts) come
out as a list of nodes. Each node's forward is the batched layer's own computation
(`batched.linear_forward`, `torch.native_batch_norm`, relu); its backward is the op
autograd itself would run for it (`bmm`, `native_batch_norm_backward`,
`threshold_backward`, `leaky_relu_backward`), and each weight's gradient is written
straight into the pack's gradient storage. The loss and its gradient at the logits
stay with autograd (`models.loss_fn`, one definition).

A network with any other part (convolutions, weight norm, a layer called twice, a
forward that does not trace) has no chain and steps with autograd (`Pack.step`):
`Chain.of` returns None and says why. Tests hold both steps to torch.optim.SGD on
the plain modules, float64, and to each other.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from rankbias.train.batched import BatchContext, BatchNorm, Conv2d, Flatten, Linear, Unflatten, linear_forward

_LEAVES = (Linear, BatchNorm, Conv2d, Unflatten, Flatten)


class _Tracer(fx.Tracer):
    """Traces down to the batched layers (and torch's own leaf modules), no further."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


class _Node:
    """One step of the chain: its kind, its input nodes (indices), its module."""
    __slots__ = ("kind", "inputs", "module", "needs_grad", "needs_grad_input", "grads")

    def __init__(self, kind: str, inputs: tuple[int, ...], module: Any = None):
        self.kind, self.inputs, self.module = kind, inputs, module
        self.needs_grad = self.needs_grad_input = False
        self.grads: tuple[Any, ...] = ()   # where a layer's parameter gradients go (None: no bias)


class Chain:
    """The traced network: `nodes[0]` is the input, the last node the logits."""

    def __init__(self, nodes: list[_Node], ctx: BatchContext):
        self.nodes, self.ctx = nodes, ctx

    @classmethod
    def of(cls, model: nn.Module, ctx: BatchContext,
           grads: dict[int, torch.Tensor]) -> tuple["Chain | None", str]:
        """(the chain of a `batched` model, "") or (None, why it has none).
        `grads` maps id(parameter) to the tensor its gradient is written to."""
        try:
            graph = _Tracer().trace(model)
        except Exception as e:  # noqa: BLE001 - any forward that does not trace steps with autograd
            return None, f"its forward does not trace ({type(e).__name__}: {e})"
        index: dict[fx.Node, int] = {}
        nodes: list[_Node] = []
        seen: set[int] = set()
        out: int | None = None
        for n in graph.nodes:
            args = n.args
            kind: str | None
            inputs: tuple[int, ...]
            if n.op == "placeholder":
                if nodes:
                    return None, "its forward takes more than one input"
                kind, inputs, module = "input", (), None
            elif n.op == "output":
                if not isinstance(args[0], fx.Node) or args[0] not in index:
                    return None, "its forward does not return one tensor"
                out = index[args[0]]
                continue
            elif any(not isinstance(a, fx.Node) for a in args) or n.kwargs:
                return None, f"{n.name}: takes arguments other than tensors"
            elif n.op == "call_module":
                module = model.get_submodule(str(n.target))
                kind = _module_kind(module)
                if kind is None:
                    what = type(module).__name__
                    if isinstance(module, Linear):
                        what = "weight-normed Linear"
                    elif isinstance(module, BatchNorm):
                        what = "BatchNorm2d"
                    elif getattr(module, "inplace", False):
                        what = f"in-place {what}"
                    return None, f"{n.target}: a {what} has no hand-written backward"
                if kind in ("linear", "batchnorm"):     # an activation may be called again
                    if id(module) in seen:
                        return None, f"{n.target}: called twice (its gradients would be summed)"
                    seen.add(id(module))
                if len(args) != 1:
                    return None, f"{n.target}: called with {len(args)} inputs"
                inputs = (index[args[0]],)
            elif n.op == "call_function" and n.target in (operator.add, torch.add) and len(args) == 2:
                kind, inputs, module = "add", (index[args[0]], index[args[1]]), None
            else:
                return None, f"{n.name}: {n.op} {getattr(n.target, '__name__', n.target)} has no hand-written backward"
            assert kind is not None      # every branch that leaves none has returned
            index[n] = len(nodes)
            nodes.append(_Node(kind, inputs, module))
        if out is None or out != len(nodes) - 1:
            return None, "its output is not its last computation"
        covered: list[int] = []
        for node in nodes:
            if node.kind in ("linear", "batchnorm"):
                params = [node.module.w, node.module.b]
                node.grads = tuple(grads[id(p)] if p is not None else None for p in params)
                covered += [id(p) for p in params if p is not None]
            node.needs_grad_input = any(nodes[i].needs_grad for i in node.inputs)
            node.needs_grad = node.kind in ("linear", "batchnorm") or node.needs_grad_input
        if sorted(covered) != sorted(grads):
            return None, "some parameters are not in its traced layers"
        return cls(nodes, ctx), ""

    # -- one step (no autograd graph: the parameters require grad for Pack's other uses)
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The training forward (BatchNorm on batch statistics, running statistics
        updated): (logits, what the backward needs)."""
        values: list[torch.Tensor] = []
        saved: list[Any] = []
        for node in self.nodes:
            ins = [values[i] for i in node.inputs]
            m = node.module
            keep: Any = None
            if node.kind == "input":
                y = x
            elif node.kind == "linear":
                y, keep = linear_forward(ins[0], m.w, m.b), ins[0]
            elif node.kind == "batchnorm":
                K, B, H = ins[0].shape
                xt = ins[0].transpose(0, 1).reshape(B, K * H)
                w = m.w.reshape(-1)
                yt, mean, invstd = torch.native_batch_norm(xt, w, m.b.reshape(-1), m.rm.view(-1),
                                                           m.rv.view(-1), True, self.ctx.bn_momentum, m.eps)
                y, keep = yt.view(B, K, H).transpose(0, 1), (xt, w, mean, invstd)
            elif node.kind == "relu":
                y = torch.relu(ins[0])
                keep = y
            elif node.kind == "leaky_relu":
                y, keep = F.leaky_relu(ins[0], m.negative_slope), ins[0]
            elif node.kind == "identity":
                y = ins[0]
            else:                                   # add
                y = ins[0] + ins[1]
            values.append(y)
            saved.append(keep)
        return values[-1], saved

    @torch.no_grad()
    def backward(self, g: torch.Tensor, saved: list) -> None:
        """From the logits' gradient, write every parameter's into its storage."""
        grads: list[torch.Tensor | None] = [None] * len(self.nodes)
        grads[-1] = g
        for i in range(len(self.nodes) - 1, 0, -1):
            node, g_i = self.nodes[i], grads[i]
            if g_i is None:
                raise RuntimeError(f"chain step: node {i} ({node.kind}) got no gradient")
            back = _BACKWARD[node.kind](node, g_i, saved[i])
            for j, gj in zip(node.inputs, back):
                if not self.nodes[j].needs_grad:
                    continue
                grads[j] = gj if grads[j] is None else grads[j] + gj
            grads[i] = saved[i] = None           # freed as soon as they are used


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, Linear):
        return None if m.wn else "linear"
    if isinstance(m, BatchNorm):
        return None if m.image else "batchnorm"
    if isinstance(m, nn.ReLU):
        return None if m.inplace else "relu"
    if isinstance(m, nn.LeakyReLU):
        return None if m.inplace else "leaky_relu"
    if isinstance(m, nn.Identity):
        return "identity"
    return None


def _linear_back(node: _Node, g: torch.Tensor, x: torch.Tensor) -> tuple:
    gw, gb = node.grads
    torch.bmm(g.transpose(1, 2), x, out=gw)
    if gb is not None:
        torch.sum(g, 1, out=gb)
    return (torch.bmm(g, node.module.w),) if node.needs_grad_input else (None,)


def _batchnorm_back(node: _Node, g: torch.Tensor, keep) -> tuple:
    xt, w, mean, invstd = keep
    m = node.module
    K, B, H = g.shape
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        g.transpose(0, 1).reshape(B, K * H), xt, w, m.rm.view(-1), m.rv.view(-1), mean, invstd,
        True, m.eps, [node.needs_grad_input, True, True])
    node.grads[0].copy_(gw.view(K, H))
    node.grads[1].copy_(gb.view(K, H))
    return (gx.view(B, K, H).transpose(0, 1) if node.needs_grad_input else None,)


def _relu_back(node: _Node, g: torch.Tensor, y: torch.Tensor) -> tuple:
    return (torch.ops.aten.threshold_backward(g, y, 0),)


def _leaky_relu_back(node: _Node, g: torch.Tensor, x: torch.Tensor) -> tuple:
    return (torch.ops.aten.leaky_relu_backward(g, x, node.module.negative_slope, False),)


_BACKWARD: dict[str, Callable[..., tuple]] = {
    "linear": _linear_back, "batchnorm": _batchnorm_back, "relu": _relu_back,
    "leaky_relu": _leaky_relu_back, "identity": lambda node, g, _: (g,), "add": lambda node, g, _: (g, g)}
