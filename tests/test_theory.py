"""The theory, measured: conventions, per-sample and batch gradient ranks against plain
autograd loops and numpy's SVD, the pack's theory columns against the reference loop,
the T1-T3 verdicts on fabricated runs, bad settings, and figures T1/T2 with audit."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import killed_and_resumed
from fabricate import fabricate
from rankbias.verify import audit
from rankbias.analysis import claims as C, figures as F, plotting
from rankbias.store import metrics as M
from rankbias.plan import sweep
from rankbias.train import theory as T
from rankbias.train.models import build_net, loss_fn, matrices
from rankbias.train.reference import train_reference
from rankbias.store.results import Run, load_runs
from rankbias.core.spec import RunSpec, SpecError
from rankbias.train.loop import train_pack


def np_rank(g) -> int:
    return int(M.rank(np.linalg.svd(np.asarray(g, dtype=np.float64), compute_uv=False)))


# -- conventions -------------------------------------------------------------------------

def test_left_distance_on_known_singular_values():
    rng = np.random.default_rng(0)
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    u, _ = np.linalg.qr(rng.normal(size=(9, 6)))
    v, _ = np.linalg.qr(rng.normal(size=(7, 6)))
    w = u @ np.diag(s) @ v.T
    sv = np.linalg.svd(w, compute_uv=False)
    for b in range(0, 8):
        expected = np.sqrt((s[b:] ** 2).sum())
        assert T.left_distance(sv, b) == pytest.approx(expected, rel=1e-12)
        # and it is the distance to the truncated SVD, the best rank-b matrix (Eckart-Young)
        uu, ss, vv = np.linalg.svd(w)
        wb = (uu[:, :b] * ss[:b]) @ vv[:b]
        assert np.linalg.norm(w - wb) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    stacked = np.stack([sv, sv * 2])
    np.testing.assert_allclose(T.left_distance(stacked, 2), [np.sqrt(1.3125 + 4), 2 * np.sqrt(5.3125)])


def test_torch_weight_decay_is_the_gradient_of_half_lambda_w_squared():
    """SGD(weight_decay=λ) steps along ∇L + λW = ∇(L + (λ/2)‖W‖²): the paper's λ is λ/2."""
    torch.manual_seed(0)
    lam, lr = 0.3, 0.1
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 5, dtype=torch.float64)
    loss = lambda w: (x @ w.T).sin().sum()
    g_reg, = torch.autograd.grad(loss(w) + lam / 2 * w.pow(2).sum(), w)
    w0 = w.detach().clone()
    opt = torch.optim.SGD([w], lr=lr, weight_decay=lam)
    opt.zero_grad()
    loss(w).backward()
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - lr * g_reg)


# -- gradients against plain autograd loops ----------------------------------------------

@pytest.mark.parametrize("model", ["MLP-3-12", "RES-2-12"])
def test_per_sample_gradients_match_an_autograd_loop_and_have_rank_one(model, synthetic64):
    spec = RunSpec.from_dict({"model": model, "dataset": "synthetic"})
    X, Y = synthetic64.x_train[:5], synthetic64.y_train[:5]
    net = build_net(spec, X.shape[1], 10).double()
    fn = T.FunctionalNet(spec, X.shape[1], 10)
    fn.net.double()
    params = dict(net.named_parameters())
    jac, lg = fn.sample_grads(params, X, Y)
    for s in range(len(X)):
        for c in range(10):
            net.zero_grad()
            net(X[s:s + 1])[0, c].backward()
            for name, kind, w in matrices(net):
                p = dict((sh, full) for sh, _, full in fn.matrices)[name]
                torch.testing.assert_close(jac[p][s, c], w.grad)
                assert np_rank(w.grad) <= 1 and np_rank(w.grad) == T.gradient_ranks(jac[p][s, c])
        net.zero_grad()
        loss_fn("ce", net(X[s:s + 1]), Y[s:s + 1]).backward()
        for name, _, w in matrices(net):
            p = dict((sh, full) for sh, _, full in fn.matrices)[name]
            torch.testing.assert_close(lg[p][s], w.grad)
            assert np_rank(w.grad) == 1 == T.gradient_ranks(lg[p][s])


@pytest.mark.parametrize("model", ["MLP-BN-2-12", "RES-BN-1-12", "MLP-2-12"])
def test_batch_gradients_match_autograd_and_rank_is_at_most_b(model, synthetic64):
    spec = RunSpec.from_dict({"model": model, "dataset": "synthetic", "batch_size": 4})
    X, Y = synthetic64.x_train, synthetic64.y_train
    net = build_net(spec, X.shape[1], 10).double().train()
    fn = T.FunctionalNet(spec, X.shape[1], 10)
    fn.net.double()
    params = {n: p.detach() for n, p in net.named_parameters()}
    sizes = T.lemma2_sizes(12, X.shape[0], fn.bn)
    assert 12 in sizes and max(sizes) >= 24 and (min(sizes) == 2) == fn.bn
    seen_binding = False
    for b in sizes:
        idx = torch.arange(b)
        g = fn.batch_grads({n: t.unsqueeze(0) for n, t in params.items()}, X[idx].unsqueeze(0), Y[idx].unsqueeze(0))
        net.zero_grad()
        loss_fn("ce", net(X[idx]), Y[idx]).backward()
        for name, _, w in matrices(net):
            p = dict((sh, full) for sh, _, full in fn.matrices)[name]
            torch.testing.assert_close(g[p][0], w.grad)
            r = np_rank(w.grad)
            assert r <= b and r == T.gradient_ranks(g[p])[0]
            seen_binding |= b < min(w.shape) and r >= b - 1
    assert seen_binding, "for small B the rank reaches the bound (B, or B - 1 under BN's centring)"


# -- the pack against the reference loop --------------------------------------------------

def _theory_pack(epochs=2):
    base = dict(dataset="synthetic", model="MLP-BN-2-16", epochs=epochs, batch_size=32,
                theory_batches=3, theory_sizes=[4, 16])
    return [RunSpec.from_dict({**base, "lr": 0.05, "weight_decay": 5e-4, "seed": 0}),
            RunSpec.from_dict({**base, "lr": 0.1, "weight_decay": 1e-3, "seed": 1}),
            RunSpec.from_dict({**base, "lr": 0.1, "weight_decay": 0.0, "seed": 2})]


def test_pack_theory_columns_equal_the_reference_loop(synthetic64, tmp_path):
    specs = _theory_pack()
    ds = synthetic64
    train_pack(specs, tmp_path / "runs", device="cpu", dataset=ds, progress=False)
    for spec in specs[:2]:
        run = Run(tmp_path / "runs" / spec.run_id)
        assert run.verify() == [] and "theory.parquet" in run.info["files"]
        th = run.table(T.THEORY_FILE)
        assert sorted(set(th["epoch"])) == [0, 1, 2] and sorted(set(th["batch_size"])) == [4, 16]
        net, _ = train_reference(spec, ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.num_classes)
        fresh = build_net(spec, ds.x_train.shape[1], ds.num_classes).double()
        for epoch, ref_net in ((0, fresh), (spec.epochs, net)):
            ref = pd.DataFrame(reference_theory_rows(ref_net, spec, ds.x_train, ds.y_train, epoch))
            got = th[th["epoch"] == epoch].reset_index(drop=True)
            assert list(got.columns) == T.THEORY_COLUMNS
            for col in ("layer", "index", "kind", "batch_size", "n_batches", "grad_rank_min", "grad_rank_max"):
                assert list(got[col]) == list(ref[col]), (epoch, col)
            for col in ("gnorm_min", "gnorm_median", "gnorm_max", "left", "right", "ratio"):
                np.testing.assert_allclose(got[col], ref[col], rtol=1e-6, atol=1e-9, err_msg=f"{epoch} {col}")
            assert (got["left"] <= got["right"]).all()
            assert (got["grad_rank_max"] <= got["batch_size"]).all()
    lam0 = Run(tmp_path / "runs" / specs[2].run_id)
    assert "theory.parquet" not in lam0.info["files"] and lam0.table(T.THEORY_FILE) is None
    assert "weight_decay is 0" in lam0.info["theory"]["theorem1"]
    assert "lemmas.parquet" in lam0.info["files"]


def test_lemma_rows_on_fresh_and_trained_networks(synthetic, tmp_path):
    specs = [RunSpec.from_dict({"dataset": "synthetic", "model": m, "epochs": 2, "batch_size": 32, "lr": 0.02})
             for m in ("MLP-2-16", "RES-1-16")]
    for s in specs:
        train_pack([s], tmp_path / "runs", device="cpu", dataset=synthetic, progress=False)
        run = Run(tmp_path / "runs" / s.run_id)
        assert not run.diverged
        lm = run.table(T.LEMMAS_FILE)
        assert set(lm["stage"]) == {"fresh", "trained"} and set(lm["epoch"]) == {0, 2}
        l1 = lm[lm["lemma"] == 1]
        assert len(l1) == 2 * T.LEMMA1_SAMPLES * 11 * len(set(lm["layer"]))
        assert (l1["rank"] <= 1).all() and (l1["rank"] == 1).any()
        l2 = lm[lm["lemma"] == 2]
        assert (l2["rank"] <= l2["batch_size"]).all()
        assert sorted(set(l2["batch_size"])) == T.lemma2_sizes(16, synthetic.x_train.shape[0], False)


def test_equal_networks_with_one_seed_are_measured_once(synthetic, monkeypatch):
    """Members whose networks are equal and whose seed draws the same samples (a fresh
    grid over lr) share their lemma rows; each copy equals the rows measured directly, and
    a member with another seed or other parameters is measured on its own."""
    base = {"dataset": "synthetic", "model": "MLP-2-16", "epochs": 1, "batch_size": 32}
    specs = [RunSpec.from_dict({**base, "lr": 0.01, "seed": 0}), RunSpec.from_dict({**base, "lr": 0.05, "seed": 0}),
             RunSpec.from_dict({**base, "lr": 0.01, "seed": 1}), RunSpec.from_dict({**base, "lr": 0.05, "seed": 0})]
    X, Y, C = synthetic.x_train, synthetic.y_train, synthetic.num_classes

    def params_of(spec):
        torch.manual_seed(spec.seed)
        return dict(build_net(spec, X.shape[1], C).named_parameters())
    first = params_of(specs[0])
    nets = [first, params_of(specs[1]), first, params_of(specs[3])]   # member 2: member 0's network, seed 1's samples
    with torch.no_grad():                    # the last member: seed 0, other parameters
        next(iter(nets[3].values())).add_(1e-3)
    stacked = {n: torch.stack([net[n].detach() for net in nets]) for n in nets[0]}
    assert all(torch.equal(stacked[n][0], stacked[n][1]) for n in stacked)

    calls = []
    measure = T.lemma_rows
    monkeypatch.setattr(T, "lemma_rows", lambda fn, member, spec, *a: calls.append(spec.lr) or measure(fn, member, spec, *a))
    rec = T.TheoryRecorder(specs, X, Y, C)
    rec.check_lemmas("fresh", 0, stacked, [False] * 4)
    assert len(calls) == 3                   # member 1 copied from member 0; 2 and 3 measured
    for k, spec in enumerate(specs):
        member = {n: t[k] for n, t in stacked.items()}
        direct = measure(rec.fn, member, spec, X, Y, "fresh", 0)
        pd.testing.assert_frame_equal(pd.DataFrame(rec.lemmas[k]), pd.DataFrame(direct))
    assert not pd.DataFrame(rec.lemmas[2]).equals(pd.DataFrame(rec.lemmas[0]))     # another seed's samples


def test_resumed_pack_measures_the_same_theory(synthetic, tmp_path):
    specs = _theory_pack(epochs=4)[:2]
    first, out = killed_and_resumed(specs, synthetic, tmp_path, kill_at=3, every=2)
    for s in specs:
        for name in (T.THEORY_FILE, T.LEMMAS_FILE):
            a, b = Run(first / s.run_id).table(name), Run(out / s.run_id).table(name)
            pd.testing.assert_frame_equal(a, b)


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, key", [({"theory_sizes": [20000]}, "theory_sizes"),
                                        ({"theory_sizes": [0, 8]}, "theory_sizes"),
                                        ({"theory_batches": 0}, "theory_batches"),
                                        ({"theory_batches": -3}, "theory_batches"),
                                        ({"model": "MLP-BN-2-8", "theory_sizes": [1]}, "theory_sizes")])
def test_plan_refuses_bad_theory_settings(extra, key):
    cfg = {"defaults": {"dataset": "mnist", "train_subset": 10000},
           "figures": {"figT2": {"model": "MLP-2-8", **extra}}}
    with pytest.raises(SpecError, match=key):
        sweep.plan(cfg)


def test_theory_keys_at_their_defaults_keep_the_run_id():
    assert RunSpec(theory_batches=32, theory_sizes=()).run_id == RunSpec().run_id
    assert "theory_batches" not in RunSpec().to_dict()
    other = RunSpec.from_dict({"theory_sizes": [64, 16], "theory_batches": 4})
    assert other.run_id != RunSpec().run_id and other.theory_sizes == (16, 64)
    assert RunSpec.from_dict(other.to_dict()) == other
    assert RunSpec(batch_size=8).theory_batch_sizes == (8,)


# -- verdicts ------------------------------------------------------------------------------

def _spec(**kw):
    base = dict(dataset="mnist", arch="mlp", depth=3, width=20, batch_size=32, epochs=4,
                train_subset=1000, test_subset=200)
    return RunSpec(**{**base, **kw})


def _lemma_table(bad_rank_at=None):
    rows = []
    for stage, epoch in (("fresh", 0), ("trained", 4)):
        for i, layer in enumerate(["fc1", "fc2", "fc3", "out"]):
            for s in range(3):
                rank = 2 if (bad_rank_at == (stage, layer, s)) else 1
                rows.append(dict(stage=stage, epoch=epoch, lemma=1, layer=layer, index=i,
                                 kind="output" if layer == "out" else "hidden", gradient="loss",
                                 sample=s, batch_size=1, rank=rank, bound=1, max_rank=10))
            for b in (1, 2, 4, 8, 16, 20, 32, 40):
                rows.append(dict(stage=stage, epoch=epoch, lemma=2, layer=layer, index=i,
                                 kind="hidden", gradient="batch loss", sample=-1, batch_size=b,
                                 rank=min(b, 20), bound=b, max_rank=20))
    return pd.DataFrame(rows, columns=T.LEMMA_COLUMNS)


def _theory_table(lam, violate_at=None, grad_rank=20):
    rows = []
    for e in range(5):
        for i, layer in enumerate(["fc1", "fc2", "fc3", "out"]):
            left, right = 1.0 + e, 10.0 * (1 + e)
            if violate_at == (e, layer):
                left = 2 * right
            rows.append(dict(epoch=e, layer=layer, index=i, kind="output" if layer == "out" else "hidden",
                             batch_size=32, n_batches=4, weight_decay=lam, grad_rank_min=grad_rank,
                             grad_rank_max=grad_rank, gnorm_min=right * lam, gnorm_median=right * lam,
                             gnorm_max=right * lam, left=left, right=right, ratio=left / right))
    return pd.DataFrame(rows, columns=T.THEORY_COLUMNS)


def _verdicts(path):
    return {c["id"]: c for c in C.judge(load_runs(path))["claims"] if c["id"].startswith("T")}


def test_t1_t3_hold_and_are_insufficient_without_tables(tmp_path):
    v = _verdicts(tmp_path)
    assert [v[k]["verdict"] for k in ("T1", "T2", "T3")] == ["insufficient"] * 3
    fabricate(tmp_path, _spec(weight_decay=5e-4), tables={T.LEMMAS_FILE: _lemma_table(),
                                                        T.THEORY_FILE: _theory_table(5e-4)})
    fabricate(tmp_path, _spec(weight_decay=0.0), tables={T.LEMMAS_FILE: _lemma_table()},
              theory={"theorem1": "weight_decay is 0: skipped"})
    v = _verdicts(tmp_path)
    assert v["T1"]["verdict"] == "holds" and v["T1"]["n_matrices"] == 8 and v["T1"]["n_samples"] == 12
    assert v["T1"]["n_gradients"] == 2 * 2 * 4 * 3 and v["T1"]["n_epochs"] == 4
    assert v["T2"]["verdict"] == "holds" and v["T2"]["n_gradients"] == 2 * 2 * 4 * 8 + 5 * 4 * 4
    assert v["T3"]["verdict"] == "holds" and v["T3"]["n_checks"] == 20 and v["T3"]["n_epochs"] == 5
    ratios = [(1 + e) / (10 * (1 + e)) for e in range(5) for _ in range(3)]
    assert v["T3"]["median_ratio"] == pytest.approx(float(np.median(ratios)))
    assert v["T3"]["n_runs_skipped_lambda0"] == 1 and v["T3"]["n_runs"] == 1
    md = C.markdown(C.judge(load_runs(tmp_path)))
    assert "| T3 |" in md and "**holds**" in md


def test_violations_name_run_matrix_epoch_and_both_sides(tmp_path):
    s1, s2 = _spec(weight_decay=5e-4, seed=1), _spec(weight_decay=1e-3, seed=2)
    fabricate(tmp_path, s1, tables={T.LEMMAS_FILE: _lemma_table(bad_rank_at=("trained", "fc2", 1)),
                                    T.THEORY_FILE: _theory_table(5e-4, violate_at=(3, "fc3"))})
    fabricate(tmp_path, s2, tables={T.LEMMAS_FILE: _lemma_table(),
                                    T.THEORY_FILE: _theory_table(1e-3, grad_rank=33)})
    v = _verdicts(tmp_path)
    assert v["T1"]["verdict"] == "fails" and v["T1"]["n_violations"] == 1
    bad = v["T1"]["violations"][0]
    assert (bad["run_id"], bad["matrix"], bad["epoch"], bad["rank"], bad["bound"]) == (s1.run_id, "fc2", 4, 2, 1)
    assert v["T2"]["verdict"] == "fails" and v["T2"]["n_violations"] == 20
    assert {x["run_id"] for x in v["T2"]["violations"]} == {s2.run_id}
    assert v["T2"]["violations"][0]["rank"] == 33 and v["T2"]["violations"][0]["bound"] == 32
    assert v["T3"]["verdict"] == "fails" and v["T3"]["n_violations"] == 1
    t3 = v["T3"]["violations"][0]
    assert (t3["run_id"], t3["matrix"], t3["epoch"]) == (s1.run_id, "fc3", 3)
    assert t3["left"] == pytest.approx(80.0) and t3["right"] == pytest.approx(40.0)
    md = C.markdown(C.judge(load_runs(tmp_path)))
    assert s1.run_id in md and '"left": 80.0' in md


def test_diverged_runs_are_left_out_of_the_theory_verdicts(tmp_path):
    fabricate(tmp_path, _spec(weight_decay=5e-4), diverged_at=2,
              tables={T.LEMMAS_FILE: _lemma_table(), T.THEORY_FILE: _theory_table(5e-4, violate_at=(1, "fc1"))})
    v = _verdicts(tmp_path)
    assert v["T3"]["verdict"] == "insufficient"


# -- figures --------------------------------------------------------------------------------

def test_theory_figures_from_trained_runs_pass_the_audit(synthetic, tmp_path, monkeypatch):
    cfg = {"defaults": {"dataset": "synthetic", "epochs": 2, "theory_batches": 2},
           "figures": {"figT1": {"model": "MLP-2-12", "grid": {"model": ["MLP-2-12", "MLP-BN-2-12"]}},
                       "figT2": {"model": "MLP-BN-2-12", "grid": {"batch_size": [8, 32],
                                                                  "weight_decay": [5e-4, 1e-3]}}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = sweep.plan(cfg)
    runs = tmp_path / "results" / "runs"
    for pid in p.packs:
        train_pack(p.pack_specs(pid), runs, device="cpu", dataset=synthetic, progress=False)
    monkeypatch.chdir(tmp_path)
    for name in ("figT1", "figT2"):
        out = tmp_path / "results" / "figures" / f"{name}.png"
        r = F.make_figure(name, path, runs, out)
        assert r["runs"] == len(p.figures[name]) and not r["missing"]
        _, a = audit.audit(out, tmp_path)
        assert a.problems == [], a.problems
        assert a.checked > 0
    fig = F.draw("figT1", F.collect(runs, p.figures["figT1"], "fro", 1e-3)[0])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("(a) Lemma 1") and titles[1].startswith("(b) Lemma 2")
    ax2 = fig.axes[1]
    assert any(ln.get_label() == "bound: rank ≤ B" for ln in ax2.get_lines())
    fig = F.draw("figT2", F.collect(runs, p.figures["figT2"], "fro", 1e-3)[0])
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    labels = {t.get_text() for t in plotting.figure_legend(fig).get_texts()}
    assert {"B=8, λ=0.0005", "B=32, λ=0.001"} <= labels


# -- the plain computation Theorem 1's recorder is held to -------------------------------

def reference_theory_rows(net: torch.nn.Module, spec: RunSpec, X, Y, epoch: int) -> list[dict]:
    """Theorem 1's rows for one plain nn.Module, the plain way: a backward per sampled
    batch (on a copy, in training mode) and numpy's SVD. The engine is held to it."""
    net = copy.deepcopy(net).train()
    full = {id(p) for p in net.parameters()}
    mats = [(s, k, w) for s, k, w in matrices(net) if k != "conv" and id(w) in full]
    rows = []
    for b in spec.theory_batch_sizes:
        idx = T.theory_batch_indices(spec, epoch, X.shape[0], b, spec.theory_batches)
        norms: dict[str, list[np.floating]] = {s: [] for s, _, _ in mats}
        ranks: dict[str, list[int]] = {s: [] for s, _, _ in mats}
        for batch in idx:
            net.zero_grad(set_to_none=True)
            loss_fn(spec.loss, net(X[batch.to(X.device)]), Y[batch.to(X.device)]).backward()
            for s, _, w in mats:
                if w.grad is None:
                    raise RuntimeError(f"{s}: no gradient from the batch loss's backward pass")
                g = w.grad.detach().double().cpu().numpy()
                norms[s].append(np.linalg.norm(g + spec.weight_decay * w.detach().double().cpu().numpy()))
                ranks[s].append(int(M.rank(np.linalg.svd(g, compute_uv=False))))
        for i, (s, kind, w) in enumerate(mats):
            sv = np.linalg.svd(w.detach().double().cpu().numpy(), compute_uv=False)
            gn, r = np.array(norms[s]), np.array(ranks[s])
            left, right = float(T.left_distance(sv, b)), float(gn.min() / spec.weight_decay)
            rows.append({"epoch": epoch, "layer": s, "index": i, "kind": kind, "batch_size": b,
                         "n_batches": spec.theory_batches, "weight_decay": spec.weight_decay,
                         "grad_rank_min": int(r.min()), "grad_rank_max": int(r.max()),
                         "gnorm_min": float(gn.min()), "gnorm_median": float(np.median(gn)),
                         "gnorm_max": float(gn.max()), "left": left, "right": right,
                         "ratio": left / right if right > 0 else float("nan")})
    return rows
