"""The paper's theory, measured: Lemmas 1-2 (gradient rank) and Theorem 1.

Conventions. ``torch.optim.SGD(weight_decay=λ)`` adds λW to the gradient of the batch
loss L_S, so the step descends the regularised loss L_S + (λ/2)‖W‖², whose gradient is

    G_S = ∇_W L_S + λW.

The paper writes the regularised loss as L_S + λ_p‖W‖², gradient ∇_W L_S + 2λ_p W, so
its λ_p is torch's λ/2. Theorem 1 bounds, for any batch S of size B*,

    min_{rank V ≤ B*} ‖W − V‖ ≤ (1 / 2λ_p) ‖G_S‖ = ‖G_S‖ / λ     (λ = torch's weight_decay).

Proof in one line: W = (G_S − ∇_W L_S)/λ, and V = −∇_W L_S/λ has rank ≤ B* (Lemma 2),
so ‖W − V‖ = ‖G_S‖/λ. In Frobenius norm the left side is sqrt(Σ_{i>B*} σ_i(W)²)
(Eckart-Young), ``left``; the right side, minimised over the sampled batches, is
``right`` = min_S ‖G_S‖_F / λ with λ the run's ``weight_decay`` as torch reads it.
Sampling batches can only raise the minimum, so left ≤ right over sampled S is still
a valid check. Every rank is the spectra's: Frobenius-normalise, count σ > 1e-3
(``metrics.DEFAULT_NORMALISE``, ``metrics.DEFAULT_TOL``).

Lemma 1: for one input x and a network without BatchNorm, ∂f_c(x)/∂W = δ_c hᵀ (h the
input W multiplies), so every output's gradient and the per-sample loss gradient have
rank ≤ 1. Lemma 2: the gradient of a batch loss over B samples is Σ_j δ_j h_jᵀ, rank
≤ B, with BatchNorm too (the paper detaches the variance; the bound holds without,
because W still multiplies only the B vectors h_j).

Gradients come from ``torch.func`` on the plain ``nn.Module`` of the run's
architecture (``functional_call``), with BatchNorm in training mode on batch
statistics (the gradient SGD takes); no running statistic is touched. The tables
this writes, and the verdicts T1-T3 judged from them, are in `rankbias.analysis.theory_verdicts`
(no torch: the claims job reads stored tables only).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

from rankbias.store import metrics as M
from rankbias.core import families
from rankbias.train import models
from rankbias.train.models import build_net, loss_fn
from rankbias.core.spec import RunSpec
from rankbias.store.theory_tables import LEMMA1_SAMPLES, LEMMA_COLUMNS, LEMMAS_FILE, THEORY_COLUMNS, THEORY_FILE

# Elements of stacked matrices held at once while measuring Theorem 1: the parameter
# copies and their gradients each take that many (float32: 256 MiB).
GRAD_BUDGET = 1 << 26


# -- the quantities ------------------------------------------------------------------

def left_distance(sv: np.ndarray, b: int) -> np.ndarray:
    """min over rank-≤b V of ‖W − V‖_F = sqrt(Σ_{i>b} σ_i²), from singular values
    [..., n] in descending order."""
    sv = np.asarray(sv, dtype=np.float64)
    return np.sqrt((sv[..., b:] ** 2).sum(-1))


def gradient_ranks(g: torch.Tensor) -> np.ndarray:
    """The spectra's rank of each matrix in a stack [..., out, in]."""
    return M.rank(M.singular_values(g).cpu().numpy())


def theory_batch_indices(spec: RunSpec, epoch: int, n: int, b: int, m: int) -> torch.Tensor:
    """[m, b] sample indices: m batches of b distinct samples, drawn for this run, epoch
    and B* alone (the training order is untouched), on the CPU."""
    g = torch.Generator().manual_seed(((spec.seed * 1_000_003 + epoch) * 65_537 + b) % (1 << 62) + 7)
    return torch.stack([torch.randperm(n, generator=g)[:b] for _ in range(m)])


def lemma2_sizes(width: int, n: int, bn: bool) -> list[int]:
    """Batch sizes B of the Lemma 2 sweep: powers of two up to twice the width, and the
    width itself, so the bound is seen to bind (rank = B) and then to stop binding."""
    sizes = {1 << k for k in range(((2 * width) - 1).bit_length() + 1)} | {width}
    return sorted(b for b in sizes if b <= n and (b >= 2 or not bn))


def _stacked_all(params: dict[str, torch.Tensor], lead: Sequence[int]) -> dict[str, torch.Tensor]:
    return {n: _stacked(t, lead) for n, t in params.items()}


def _vmapped(f, depth: int):
    for _ in range(depth):
        f = vmap(f)
    return f


def _stacked(t: torch.Tensor, lead: Sequence[int]) -> torch.Tensor:
    """One network's tensor repeated into a stack [*lead, ...] of separate copies."""
    return t.detach().reshape((1,) * len(lead) + t.shape).repeat(*lead, *([1] * t.dim()))


class FunctionalNet:
    """The run's architecture as a function of stacked parameters.

    Parameters carry leading stack dimensions ([*lead, ...], e.g. members x batches) and
    the forward is `functional_call` vmapped over them; gradients come from one ordinary
    backward of the summed objective, which gives every stacked copy its own gradient.
    (The loss is taken outside vmap, and no `torch.func.grad` is used: both would pull
    in the compiler stack, seconds of imports in every training job.)

    ``matrices`` are the fully connected weight matrices, as (short name, kind,
    parameter name) in ``models.matrices`` order: the 2-D weights that are parameters of
    their own (a weight-normed matrix is computed from two, a kernel is no matrix).

    It is not the pack's batched network (`rankbias.train.engine.Pack.model`): that one's
    layers are bound to the pack's own [K, ...] parameters, one copy a member, while these
    measurements stack other copies (members x sampled batches for Theorem 1, samples x
    outputs of one member for Lemma 1), and its BatchNorm in training mode updates the
    pack's running statistics in place."""

    def __init__(self, spec: RunSpec, in_dim: int, num_classes: int):
        net = build_net(spec, in_dim, num_classes)
        replace_all_batch_norm_modules_(net)     # batch statistics, no running ones
        self.net = net.train()
        self.loss, self.bn, self.num_classes = spec.loss, families.family(spec.arch).batchnorm, num_classes
        full = {id(p): n for n, p in net.named_parameters()}
        self.matrices = [(short, kind, full[id(w)]) for short, kind, w in models.matrices(net)
                         if kind != "conv" and id(w) in full]

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor, lead: int) -> torch.Tensor:
        """params [*L, ...], x [*L, b, D] (len(L) == lead) -> logits [*L, b, C]."""
        return _vmapped(lambda p, xb: functional_call(self.net, p, (xb,)), lead)(params, x)

    def batch_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of each stacked batch: logits [*L, b, C], y [*L, b] -> [*L]."""
        per = loss_fn(self.loss, logits.flatten(0, -2), y.flatten(), "none")
        return per.view(logits.shape[:-1]).mean(-1)

    def grads(self, params: dict[str, torch.Tensor], x: torch.Tensor, objective, lead: int
              ) -> dict[str, torch.Tensor]:
        """∂ objective(logits)[i] / ∂W_i of every matrix for every stacked copy i:
        params [*L, ...] -> {parameter name: [*L, out, in]}."""
        leaves = {p: params[p].detach().clone(memory_format=torch.contiguous_format).requires_grad_(True) for _, _, p in self.matrices}
        full = {**{n: t.detach() for n, t in params.items()}, **leaves}
        with torch.enable_grad():
            obj = objective(self.logits(full, x, lead))
            gs = torch.autograd.grad(obj.sum(), list(leaves.values()))
        return dict(zip(leaves, gs))

    def batch_grads(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """∇_W L_S for stacked batches: params [*L, ...], x [*L, b, D], y [*L, b]."""
        return self.grads(params, x, lambda z: self.batch_loss(z, y), y.dim() - 1)

    def sample_grads(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[dict, dict]:
        """One network's per-sample gradients for inputs x [S, D]: (∂f_c(x)/∂W
        [S, C, out, in] for every output c, ∇_W loss(x) [S, out, in]) of each matrix."""
        S, C = x.shape[0], self.num_classes
        per_output = _stacked_all(params, (S, C))
        xs = x.view(S, 1, 1, -1).expand(S, C, 1, x.shape[1])
        jac = self.grads(per_output, xs, lambda z: z[:, :, 0, :].diagonal(dim1=1, dim2=2), 2)
        per_sample = _stacked_all(params, (S,))
        lg = self.batch_grads(per_sample, x.view(S, 1, -1), y.view(S, 1))
        return jac, lg


# -- the lemma checks ----------------------------------------------------------------

def lemma_rows(fn: FunctionalNet, params: dict[str, torch.Tensor], spec: RunSpec, X, Y,
               stage: str, epoch: int) -> list[dict]:
    """Lemma 1 (networks without BatchNorm) and Lemma 2 on one network's parameters."""
    params = {n: t.detach() for n, t in params.items()}
    n, rows = X.shape[0], []
    shapes = {p: tuple(params[p].shape) for _, _, p in fn.matrices}

    def row(lemma, i, name, kind, param, gradient, sample, b, r, bound):
        rows.append({"stage": stage, "epoch": epoch, "lemma": lemma, "layer": name, "index": i,
                     "kind": kind, "gradient": gradient, "sample": sample, "batch_size": b,
                     "rank": int(r), "bound": int(bound), "max_rank": min(shapes[param])})

    if not fn.bn:
        idx = theory_batch_indices(spec, epoch, n, min(LEMMA1_SAMPLES, n), 1)[0].to(X.device)
        jac, lg = fn.sample_grads(params, X[idx], Y[idx])
        for i, (name, kind, p) in enumerate(fn.matrices):
            jr, lr = gradient_ranks(jac[p]), gradient_ranks(lg[p])      # [S, C], [S]
            for s in range(len(idx)):
                for c in range(jr.shape[1]):
                    row(1, i, name, kind, p, f"output {c}", s, 1, jr[s, c], 1)
                row(1, i, name, kind, p, "loss", s, 1, lr[s], 1)
    for b in lemma2_sizes(max(min(s) for s in shapes.values()), n, fn.bn):
        idx = theory_batch_indices(spec, epoch, n, b, 1).to(X.device)
        g = fn.batch_grads(_stacked_all(params, (1,)), X[idx], Y[idx])
        for i, (name, kind, p) in enumerate(fn.matrices):
            row(2, i, name, kind, p, "batch loss", -1, b, gradient_ranks(g[p])[0], b)
    return rows


# -- measured during training ----------------------------------------------------------

class TheoryRecorder:
    """Theorem 1 at every logged epoch and the lemma checks on the fresh and the trained
    networks, for every member of a pack; rows kept per member, checkpointable.

    The Theorem 1 measurement is one vmap over the members with λ > 0 and their
    sampled batches, in chunks that hold at most GRAD_BUDGET gradient elements."""

    def __init__(self, specs: Sequence[RunSpec], X: torch.Tensor, Y: torch.Tensor, num_classes: int):
        self.specs, self.X, self.Y = list(specs), X, Y
        self.fn = FunctionalNet(specs[0], X.shape[1], num_classes)
        self.fn.net.to(X.device, X.dtype)
        self.theory: list[list[dict]] = [[] for _ in specs]
        self.lemmas: list[list[dict]] = [[] for _ in specs]
        self.seconds = {"theorem1": 0.0, "lemmas": 0.0}     # time spent measuring, for the overhead

    def state(self) -> dict:
        return {"theory": self.theory, "lemmas": self.lemmas, "seconds": self.seconds}

    def load_state(self, st: dict) -> None:
        self.theory, self.lemmas, self.seconds = st["theory"], st["lemmas"], st["seconds"]

    @staticmethod
    def skipped(spec: RunSpec) -> str | None:
        """Why Theorem 1 is not measured for this run (None when it is)."""
        if spec.weight_decay == 0:
            return "weight_decay is 0: Theorem 1 bounds the distance by ‖G_S‖/λ, which needs λ > 0"
        return None

    def measure(self, epoch: int, params: dict[str, torch.Tensor], spectra: Sequence[dict],
                dead: Sequence[bool]) -> None:
        """Theorem 1 for every live member with λ > 0; `spectra[k][matrix]` is the stored
        spectrum of member k at this epoch."""
        t0 = time.perf_counter()
        live = [k for k, s in enumerate(self.specs) if not dead[k] and self.skipped(s) is None]
        if live:
            sel = torch.tensor(live, device=self.X.device)
            members = {n: p.detach()[sel] for n, p in params.items()}
            for b in sorted({b for k in live for b in self.specs[k].theory_batch_sizes}):
                self._measure_size(epoch, b, live, members, spectra)
        self.seconds["theorem1"] += time.perf_counter() - t0

    @torch.no_grad()
    def _measure_size(self, epoch, b, live, members, spectra) -> None:
        n, dev = self.X.shape[0], self.X.device
        m = max(self.specs[k].theory_batches for k in live)
        idx = torch.stack([theory_batch_indices(self.specs[k], epoch, n, b, m) for k in live]).to(dev)
        wd = torch.tensor([self.specs[k].weight_decay for k in live], dtype=self.X.dtype, device=dev)
        per_batch = sum(members[p].numel() for _, _, p in self.fn.matrices)   # K elements per batch
        chunk = max(1, GRAD_BUDGET // per_batch)
        norms: dict[str, list[np.ndarray]] = {p: [] for _, _, p in self.fn.matrices}
        ranks: dict[str, list[np.ndarray]] = {p: [] for _, _, p in self.fn.matrices}
        for c0 in range(0, m, chunk):
            ci = idx[:, c0:c0 + chunk]
            stacked = {n: t.unsqueeze(1).expand(t.shape[0], ci.shape[1], *t.shape[1:])
                       for n, t in members.items()}
            g = self.fn.batch_grads(stacked, self.X[ci], self.Y[ci])
            for _, _, p in self.fn.matrices:
                gs = torch.addcmul(g[p], wd.view(-1, 1, 1, 1), members[p].unsqueeze(1))   # G_S = ∇L_S + λW
                norms[p].append(torch.linalg.vector_norm(gs, dim=(-2, -1), dtype=torch.float64).cpu().numpy())
                ranks[p].append(gradient_ranks(g[p]))
            del g
        all_norms = {p: np.concatenate(norms[p], 1) for _, _, p in self.fn.matrices}
        all_ranks = {p: np.concatenate(ranks[p], 1) for _, _, p in self.fn.matrices}
        for j, k in enumerate(live):
            spec = self.specs[k]
            if b not in spec.theory_batch_sizes:
                continue
            mk, lam = spec.theory_batches, spec.weight_decay
            for i, (name, kind, p) in enumerate(self.fn.matrices):
                gn = all_norms[p][j, :mk]
                r = all_ranks[p][j, :mk]
                left = float(left_distance(spectra[k][name], b))
                right = float(gn.min() / lam)
                self.theory[k].append({
                    "epoch": epoch, "layer": name, "index": i, "kind": kind, "batch_size": b,
                    "n_batches": mk, "weight_decay": lam,
                    "grad_rank_min": int(r.min()), "grad_rank_max": int(r.max()),
                    "gnorm_min": float(gn.min()), "gnorm_median": float(np.median(gn)),
                    "gnorm_max": float(gn.max()), "left": left, "right": right,
                    "ratio": left / right if right > 0 else float("nan")})

    def check_lemmas(self, stage: str, epoch: int, params: dict[str, torch.Tensor],
                     dead: Sequence[bool]) -> None:
        """The lemma checks on every live member's current parameters.

        A member whose network equals an earlier one's, parameter for parameter, and whose
        seed draws the same samples (`theory_batch_indices`) has the same rows: they are
        copied, not measured again. That is every fresh network of a grid over lr,
        momentum or weight decay (the initialisation depends on the seed alone), where the
        checks are most of epoch 0 (a 12-member RES-5-500 pack: minutes on one core)."""
        t0 = time.perf_counter()
        measured: list[tuple[int, dict[str, torch.Tensor], list[dict]]] = []   # (seed, network, rows)
        for k, spec in enumerate(self.specs):
            if dead[k]:
                continue
            member = {n: p.detach()[k] for n, p in params.items()}
            twin = next((rows for seed, other, rows in measured if seed == spec.seed
                         and all(torch.equal(other[n], member[n]) for n in member)), None)
            if twin is None:
                rows = lemma_rows(self.fn, member, spec, self.X, self.Y, stage, epoch)
                measured.append((spec.seed, member, rows))
                self.lemmas[k] += rows
            else:
                self.lemmas[k] += [dict(r) for r in twin]
        self.seconds["lemmas"] += time.perf_counter() - t0

    def tables(self, k: int) -> dict[str, pd.DataFrame]:
        """The member's theory files: lemmas.parquet always, theory.parquet when λ > 0."""
        out = {LEMMAS_FILE: pd.DataFrame(self.lemmas[k], columns=LEMMA_COLUMNS)}
        if self.skipped(self.specs[k]) is None:
            out[THEORY_FILE] = pd.DataFrame(self.theory[k], columns=THEORY_COLUMNS)
        return out

    def summary(self, k: int) -> dict:
        """What run.json says about the member's theory files."""
        spec = self.specs[k]
        return {"theorem1": self.skipped(spec) or "measured",
                "theory_sizes": list(spec.theory_batch_sizes), "theory_batches": spec.theory_batches,
                "rank": {"normalise": M.DEFAULT_NORMALISE, "tol": M.DEFAULT_TOL}}
