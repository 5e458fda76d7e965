"""The batched engine against the plain PyTorch reference loop, resume, divergence."""
import json

import numpy as np
import pytest
import torch
from conftest import killed_and_resumed, sgd_references, step_references, steps_equal_reference

from rankbias.store import metrics as M
from rankbias.train.batched import BN_MOMENTUM
from rankbias.train.engine import Pack
from rankbias.train.models import epoch_labels
from rankbias.train.reference import epoch_order, train_reference
from rankbias.store.results import Run
from rankbias.core.spec import RunSpec
from rankbias.train.loop import train_pack


def _pack(model, loss="ce", epochs=3, schedule=None, batch=100, drop_last=False):
    """Three members that differ in lr, weight decay, momentum and seed. The synthetic
    set's 1024 samples make B=100 ten full batches and a last one of 24."""
    extra = dict(schedule="multistep", milestones=(2,), gamma=0.5) if schedule else {}
    base = dict(dataset="synthetic", model=model, loss=loss, epochs=epochs, log_every=1,
                batch_size=batch, drop_last=drop_last, **extra)
    return [RunSpec.from_dict({**base, "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "seed": 0}),
            RunSpec.from_dict({**base, "lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9, "seed": 1}),
            RunSpec.from_dict({**base, "lr": 0.02, "weight_decay": 1e-3, "momentum": 0.5, "seed": 2})]


def _compare(specs, ds, tmp_path, rtol, atol, acc_samples=0):
    train_pack(specs, tmp_path / "runs", device="cpu", dataset=ds, progress=False)
    for spec in specs:
        run = Run(tmp_path / "runs" / spec.run_id)
        _, hist = train_reference(spec, ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.num_classes)
        m = run.metrics.set_index("epoch")
        assert list(m.index) == list(range(spec.epochs + 1))
        for e, row in enumerate(hist):
            for key in ("train_loss", "test_loss"):
                np.testing.assert_allclose(m.loc[e, key], row[key], rtol=rtol, atol=atol,
                                           err_msg=f"{spec.model} B={spec.batch_size} epoch {e} {key}")
            for key, n in (("train_acc", len(ds.y_train)), ("test_acc", len(ds.y_test))):
                # rounding may flip the arg-max of at most a sample or two
                assert abs(m.loc[e, key] - row[key]) <= acc_samples / n, (spec.model, e, key)
            names = run.layer_names
            for i, name in enumerate(names):
                sv_ref = np.linalg.svd(row["matrices"][name].double().numpy(), compute_uv=False)
                sv = run.spectra[f"sv_{i}"][e]
                np.testing.assert_allclose(sv, sv_ref, rtol=0, atol=atol * 10 + rtol * sv_ref.max(),
                                           err_msg=f"{name} epoch {e}")
                assert int(M.rank(sv)) == int(M.rank(sv_ref))
        # the distance between consecutive epochs, output layer included
        for e in range(1, len(hist)):
            d = np.mean([np.linalg.norm(hist[e]["matrices"][n] - hist[e - 1]["matrices"][n])
                         / np.linalg.norm(hist[e - 1]["matrices"][n]) for n in run.layer_names])
            np.testing.assert_allclose(m.loc[e, "distance"], d, rtol=max(rtol, 1e-6) * 100)


@pytest.mark.parametrize("model", ["MLP-BN-2-16", "MLP-2-16", "RES-BN-2-16", "RES-2-16"])
def test_first_steps_equal_torch_sgd_float64(model, synthetic64):
    """Step by step through a whole epoch, its partial last batch included, each
    member's parameters and BatchNorm statistics equal nn.Module + torch.optim.SGD's
    up to float64 rounding (both see the same mini-batches)."""
    ds = synthetic64
    specs = _pack(model)
    plan = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, "cpu").epoch_plan(0)
    assert (plan.steps, plan.full_steps, plan.last_idx.shape) == (11, 10, (3, 24))
    steps_equal_reference(specs, ds, plan.steps, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("stepper", ["eager", "static-buffers"])
@pytest.mark.parametrize("batch", [32, 100])
def test_momentum_buffers_equal_torch_sgd_state_float64(stepper, batch, synthetic64):
    """After 3 steps every member's momentum buffers, not only its parameters, equal
    torch.optim.SGD's `momentum_buffer` state, for each way the engine can step (the
    plain step and the static-buffer replay a CUDA graph uses). An update that
    mutated the buffers wrongly but kept parameters close (as a compiled step once
    did, buffers ~20% off after 3 steps) fails here."""
    from rankbias.train.engine import StaticStep
    ds = synthetic64
    specs = _pack("MLP-BN-2-16", batch=batch)
    pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, "cpu")
    plan = pack.epoch_plan(0)
    step = pack.step if stepper == "eager" else StaticStep(pack, plan.inputs(0))
    refs = sgd_references(specs, ds)
    for t in range(3):
        step(plan.inputs(t))
        step_references(refs, t)
    names = list(pack.params)
    for k, ref in enumerate(refs):
        for (name, p) in ref.net.named_parameters():
            buf = pack.bufs[names.index(name)][k]
            np.testing.assert_allclose(buf.numpy(), ref.opt.state[p]["momentum_buffer"].numpy(),
                                       rtol=1e-11, atol=1e-13, err_msg=f"member {k} {name} momentum")


def _first_unequal_step(spec, ds, update):
    """A K=1 pack in float32 with `update`, stepped through epoch 0 (the synthetic set: ten
    batches of 100 and a last one of 24) beside nn.Module + torch.optim.SGD in float32 on the
    same batches: the first step after which a parameter, momentum buffer or BatchNorm
    statistic is not bitwise equal (torch.equal), or None when every step is."""
    pack = Pack([spec], ds.x_train, ds.y_train, ds.num_classes, "cpu", update=update)
    plan = pack.epoch_plan(0)
    assert pack.dtype == torch.float32 and (plan.steps, plan.full_steps) == (11, 10)
    refs = sgd_references([spec], ds)
    (ref,) = refs
    net, opt = ref.net, ref.opt
    names = list(pack.params)
    for t in range(plan.steps):
        pack.step(plan.inputs(t))
        step_references(refs, t)
        for name, p in net.named_parameters():
            buf = opt.state[p].get("momentum_buffer")
            if not torch.equal(pack.params[name][0], p) or (
                    buf is not None and not torch.equal(pack.bufs[names.index(name)][0], buf)):
                return t + 1
        for name, b in net.named_buffers():
            if name in pack.running and not torch.equal(pack.running[name][0], b):
                return t + 1
    return None


@pytest.mark.parametrize("model, lr, wd, momentum", [
    ("MLP-BN-2-16", 0.1, 5e-4, 0.9), ("MLP-2-16", 0.1, 5e-4, 0.9), ("RES-BN-2-16", 0.1, 5e-4, 0.9),
    ("RES-2-16", 0.1, 5e-4, 0.9), ("MLP-BN-2-16", 0.05, 0.0, 0.9), ("MLP-BN-2-16", 0.02, 1e-3, 0.0)])
def test_update_torch_follows_torch_sgd_bit_for_bit_float32(synthetic, model, lr, wd, momentum):
    """Exact mode: with update "torch" a K=1 pack on the CPU in float32 equals nn.Module +
    torch.optim.SGD bit for bit after every step of an epoch, its partial last batch
    included (weight decay 0 and momentum 0 skip their operations, as torch does). The
    default fused update, on the same batches, does not: the same comparison catches it
    within the epoch."""
    spec = RunSpec.from_dict(dict(dataset="synthetic", model=model, batch_size=100, lr=lr, weight_decay=wd,
                                  momentum=momentum, epochs=1, seed=1))
    assert _first_unequal_step(spec, synthetic, "torch") is None
    if momentum and wd:
        assert _first_unequal_step(spec, synthetic, "fused") is not None


def test_train_pack_with_update_torch_records_it(synthetic, tmp_path):
    """`rankbias train --update torch` reaches the pack, and run.json says which update ran."""
    from rankbias.cli import main
    spec = RunSpec.from_dict(dict(dataset="synthetic", model="MLP-2-8", epochs=1, batch_size=100, seed=3))
    (tmp_path / "pack.json").write_text(json.dumps([spec.to_dict()]))
    assert main(["train", str(tmp_path / "pack.json"), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 "--update", "torch", "--quiet"]) == 0
    assert json.loads((tmp_path / "runs" / spec.run_id / "run.json").read_text())["update"] == "torch"
    (path,) = train_pack([spec], tmp_path / "fused", device="cpu", dataset=synthetic, progress=False)
    assert json.loads((path / "run.json").read_text())["update"] == "fused"


def test_update_modes_are_checked_by_name(synthetic):
    spec = RunSpec.from_dict(dict(dataset="synthetic", model="MLP-2-16", epochs=1))
    with pytest.raises(ValueError, match="update: 'exact' is not one of fused, torch"):
        Pack([spec], synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu", update="exact")
    with pytest.raises(ValueError, match="update 'torch'.*CPU only; this pack is on meta"):
        Pack([spec], synthetic.x_train, synthetic.y_train, synthetic.num_classes, "meta", update="torch")


@pytest.mark.parametrize("model", ["MLP-BN-2-16", "RES-BN-2-16", "RES-2-16"])
def test_pack_matches_reference_float64(model, synthetic64, tmp_path):
    """Same seeds and data order: over three epochs (with an lr drop, and each epoch's
    partial last batch) every member's losses, accuracies, spectra, ranks and distances
    equal its own plain PyTorch run. Summation order differs (bmm vs mm), so agreement
    is to rounding, not bitwise."""
    _compare(_pack(model, schedule=True), synthetic64, tmp_path, rtol=1e-8, atol=1e-11)


def test_pack_with_drop_last_matches_reference_float64(synthetic64, tmp_path):
    _compare(_pack("MLP-BN-2-16", epochs=2, drop_last=True), synthetic64, tmp_path, rtol=1e-8, atol=1e-11)


def test_pack_matches_reference_float32_mse(synthetic, tmp_path):
    _compare(_pack("MLP-BN-3-32", loss="mse", epochs=2), synthetic, tmp_path, rtol=5e-4, atol=5e-5,
             acc_samples=3)


def test_pack_without_a_partial_batch_matches_reference(synthetic64, tmp_path):
    _compare(_pack("MLP-BN-2-16", epochs=2, batch=32), synthetic64, tmp_path, rtol=1e-7, atol=1e-9)


def test_partial_last_batch_by_hand(synthetic64):
    """n=10, B=4: batches of 4, 4 and 2 samples of each member's own order; the last
    step's BatchNorm statistics are over its 2 samples, the running variance unbiased
    by 2/(2-1), as nn.BatchNorm1d does on a batch of 2."""
    x, y = synthetic64.x_train[:10], synthetic64.y_train[:10]
    specs = [RunSpec(dataset="synthetic", arch="mlp_bn", depth=1, width=4, batch_size=4,
                     lr=lr, momentum=m, weight_decay=wd, seed=seed)
             for lr, m, wd, seed in ((0.1, 0.9, 0.0, 0), (0.05, 0.0, 1e-3, 1))]
    assert [s.steps_per_epoch(10) for s in specs] == [3, 3]
    assert RunSpec(batch_size=4, drop_last=True).steps_per_epoch(10) == 2
    pack = Pack(specs, x, y, 10, "cpu")
    plan = pack.epoch_plan(0)
    assert (plan.steps, plan.full_steps) == (3, 2)
    for k, s in enumerate(specs):
        order = epoch_order(s, 0, 10)
        batches = [plan.inputs(t).idx[k].tolist() for t in range(3)]
        assert batches == [order[:4].tolist(), order[4:8].tolist(), order[8:].tolist()]
    for t in range(2):
        pack.step(plan.inputs(t))
    w, b = (pack.params[f"hidden.fc1.{n}"].detach().clone() for n in ("weight", "bias"))
    rm, rv = (pack.running[f"hidden.bn1.running_{n}"].clone() for n in ("mean", "var"))
    last = plan.inputs(2).idx                                        # [2 members, 2 samples]
    pack.step(plan.inputs(2))
    for k in range(2):
        h = (x[last[k]] @ w[k].T + b[k]).numpy()                      # the 2 rows' activations
        mean, var = h.mean(0), ((h[0] - h[1]) ** 2) / 2             # unbiased over 2 rows
        np.testing.assert_allclose(pack.running["hidden.bn1.running_mean"][k].numpy(),
                                   0.9 * rm[k].numpy() + 0.1 * mean, rtol=1e-12)
        np.testing.assert_allclose(pack.running["hidden.bn1.running_var"][k].numpy(),
                                   0.9 * rv[k].numpy() + 0.1 * var, rtol=1e-12)


def test_pack_rejects_mixed_batch_sizes_and_a_last_batch_of_one(synthetic):
    a = RunSpec(dataset="synthetic", arch="mlp_bn", depth=2, width=16, batch_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        Pack([a, RunSpec.from_dict({**a.to_dict(), "batch_size": 64})], synthetic.x_train,
             synthetic.y_train, 10, "cpu")
    one_left = RunSpec.from_dict({**a.to_dict(), "batch_size": 3})     # 1024 = 341 * 3 + 1
    with pytest.raises(ValueError, match="batch_size: 3 leaves a last batch of 1.*drop_last"):
        Pack([one_left], synthetic.x_train, synthetic.y_train, 10, "cpu")
    Pack([RunSpec.from_dict({**one_left.to_dict(), "drop_last": True})], synthetic.x_train,
         synthetic.y_train, 10, "cpu")


def test_batchnorm_momentum_is_a_constant_of_the_pack(synthetic):
    """BatchNorm's momentum is the pack's (torch's nn.BatchNorm default), not a step
    input: a training forward moves the running statistics, an evaluation forward not."""
    pack = Pack(_pack("MLP-BN-2-16"), synthetic.x_train, synthetic.y_train, 10, "cpu")
    assert pack.ctx.bn_momentum == BN_MOMENTUM == torch.nn.BatchNorm1d(4).momentum
    xb = synthetic.x_train[:8].unsqueeze(0).expand(pack.K, -1, -1)     # [K, B, D]
    before = [b.clone() for b in pack.running.values()]
    assert pack.forward(xb).shape == (pack.K, 8, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, pack.running.values()))
    pack.forward(xb, train=True)
    assert not all(torch.equal(a, b) for a, b in zip(before, pack.running.values()))


def _read_all(path):
    run = Run(path)
    info = run.info
    return (run.metrics, run.layers, run.spectra,
            {k: v for k, v in info.items()
             if k not in ("wall_time_s", "theory_time_s", "provenance", "files", "record_sha256")})


def test_resume_after_kill_equals_uninterrupted(synthetic, tmp_path):
    """Byte-identical outputs after a kill and a resume, for a member with label noise too:
    its draws depend on seed and epoch alone, so the checkpoint needs no generator state."""
    specs = _noisy(_pack("MLP-BN-2-16", epochs=4), (0.0, 0.3, 0.0))
    ckpt = tmp_path / "b" / "packs"

    def after_kill(out):
        assert not out.exists() or not any(out.iterdir()), "no run output before the pack finishes"
        assert list(ckpt.glob("*/checkpoint.pt")), "a checkpoint was written at epoch 2"

    first, out = killed_and_resumed(specs, synthetic, tmp_path, kill_at=3, every=2, after_kill=after_kill)
    assert not list(ckpt.glob("*/checkpoint.pt")), "checkpoint removed once outputs are written"
    for spec in specs:
        a = _read_all(first / spec.run_id)
        b = _read_all(out / spec.run_id)
        a[0].equals(b[0]) or pytest.fail(f"metrics differ:\n{a[0]}\n{b[0]}")
        assert a[1].equals(b[1])
        for k in a[2]:
            np.testing.assert_array_equal(a[2][k], b[2][k])
        assert a[3] == b[3]
        assert ("label_noise" in a[3]["seeds"]) == (spec.label_noise > 0)


def test_diverged_member_is_recorded_and_does_not_disturb_others(synthetic, tmp_path):
    ok = RunSpec(dataset="synthetic", arch="mlp", depth=2, width=16, batch_size=32, lr=0.05, epochs=3, seed=0)
    bad = RunSpec(dataset="synthetic", arch="mlp", depth=2, width=16, batch_size=32, lr=1e4, epochs=3, seed=1,
                  weight_decay=0.0)
    train_pack([ok], tmp_path / "alone", device="cpu", dataset=synthetic, progress=False)
    train_pack([ok, bad], tmp_path / "both", device="cpu", dataset=synthetic, progress=False)
    b = Run(tmp_path / "both" / bad.run_id)
    assert b.diverged and b.info["diverged"]["epoch"] >= 1 and "non-finite" in b.info["diverged"]["reason"]
    assert b.metrics["diverged"].iloc[-1]
    assert np.isnan(b.metrics["train_loss"].iloc[-1])
    assert (b.mean_rank().iloc[1:].isna()).all()
    a1, a2 = Run(tmp_path / "alone" / ok.run_id), Run(tmp_path / "both" / ok.run_id)
    np.testing.assert_allclose(a1.metrics["train_loss"], a2.metrics["train_loss"], rtol=1e-5)
    assert not a2.diverged


def test_pack_rejects_mixed_architectures(synthetic):
    a = RunSpec(dataset="synthetic", arch="mlp", depth=2, width=16)
    b = RunSpec(dataset="synthetic", arch="mlp", depth=3, width=16)
    with pytest.raises(ValueError, match="share"):
        Pack([a, b], synthetic.x_train, synthetic.y_train, 10, "cpu")


def test_run_json_records_provenance(synthetic, tmp_path):
    spec = RunSpec(dataset="synthetic", arch="mlp_bn", depth=2, width=8, epochs=1, batch_size=64)
    train_pack([spec], tmp_path / "runs", device="cpu", dataset=synthetic, progress=False)
    info = json.loads((tmp_path / "runs" / spec.run_id / "run.json").read_text())
    assert info["run_id"] == spec.run_id and info["spec"] == spec.to_dict()
    assert info["epochs_completed"] == 1 and info["device"] == "cpu"
    assert set(info["files"]) == {"metrics.parquet", "layers.parquet", "spectra.npz",
                                  "lemmas.parquet", "theory.parquet"}
    assert "code" in info["provenance"] and "packages" in info["provenance"]
    assert info["dataset"]["name"] == "synthetic"
    assert Run(tmp_path / "runs" / spec.run_id).verify() == []


@pytest.mark.parametrize("shape", [(100, 3072), (100, 1024), (10, 512), (100, 100)])
@pytest.mark.parametrize("rows", [8, 32])
def test_both_forms_of_the_batched_linear_agree_to_rounding(shape, rows):
    """A large wide layer's forward is computed as (w @ x^T)^T, the others as x @ w^T:
    the same products summed in another order, so float64 outputs agree to rounding,
    and the gradients (one backward for both) to rounding too."""
    from rankbias.train.batched import WIDE_MATRIX, WIDE_ROWS, BatchedLinearFn

    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, rows, in_f, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, out_f, in_f, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, out_f, dtype=torch.float64, generator=g, requires_grad=True)
    got = BatchedLinearFn.apply(x, w, b)
    want = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-12)
    wide = in_f >= 4 * out_f and in_f * out_f >= WIDE_MATRIX and rows >= WIDE_ROWS
    assert wide == (shape in [(100, 3072), (100, 1024)] and rows == 32)
    up = torch.randn(got.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(got, (x, w, b), up)
    ref = torch.autograd.grad(want, (x, w, b), up)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=1e-13, atol=1e-12)


# -- label noise (check R3) ----------------------------------------------------------------

def _noisy(specs, noise):
    """`specs` with each member's label_noise from `noise` (0: the run as it was)."""
    return [RunSpec.from_dict({**s.to_dict(), "label_noise": p}) for s, p in zip(specs, noise)]


def test_epoch_labels_redraw_a_fraction_per_run_and_epoch():
    y = torch.arange(20000) % 10
    spec = RunSpec(dataset="synthetic", label_noise=0.3, seed=4)
    drawn = epoch_labels(spec, 2, y, 10)
    assert drawn.dtype == y.dtype and int(drawn.min()) >= 0 and int(drawn.max()) < 10
    assert torch.equal(drawn, epoch_labels(spec, 2, y, 10))                    # deterministic
    assert not torch.equal(drawn, epoch_labels(spec, 3, y, 10))                # fresh each epoch
    assert not torch.equal(drawn, epoch_labels(RunSpec.from_dict({**spec.to_dict(), "seed": 5}), 2, y, 10))
    # redrawn with probability p from all 10 classes, its own included: changed with p * 9/10
    assert abs(float((drawn != y).double().mean()) - 0.3 * 0.9) < 0.015
    assert epoch_labels(RunSpec(dataset="synthetic"), 2, y, 10) is y           # p = 0: nothing drawn


def test_epoch_plan_carries_each_members_labels(synthetic):
    specs = _noisy(_pack("MLP-BN-2-16"), (0.0, 0.5, 0.0))
    pack = Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu")
    plan = pack.epoch_plan(1)
    for t in (0, plan.steps - 1):                      # a full batch and the partial last one
        s = plan.inputs(t)
        true = synthetic.y_train[s.idx]
        assert torch.equal(s.y[0], true[0]) and torch.equal(s.y[2], true[2])
        assert not torch.equal(s.y[1], true[1])
    order = epoch_order(specs[1], 1, synthetic.x_train.shape[0])
    labels = epoch_labels(specs[1], 1, synthetic.y_train[order], synthetic.num_classes)
    assert torch.equal(plan.inputs(0).y[1], labels[:100])


@pytest.mark.parametrize("model", ["MLP-BN-2-16", "RES-2-16"])
def test_label_noise_steps_equal_torch_sgd_float64(model, synthetic64):
    """Members with different label noise, 0 among them, step by step through an epoch:
    each equals its nn.Module + torch.optim.SGD fed the same noisy labels."""
    specs = _noisy(_pack(model), (0.3, 0.0, 0.6))
    steps = specs[0].steps_per_epoch(synthetic64.x_train.shape[0])
    steps_equal_reference(specs, synthetic64, steps, rtol=1e-11, atol=1e-13)


def test_pack_with_label_noise_matches_reference_float64(synthetic64, tmp_path):
    """Over three epochs (fresh draws each, an lr drop, partial last batches), a pack whose
    members' label noise differs (0 among them) equals the plain reference loop run by
    run; losses and accuracies are the true labels' in both."""
    _compare(_noisy(_pack("MLP-BN-2-16", schedule=True), (0.2, 0.0, 0.5)), synthetic64, tmp_path,
             rtol=1e-8, atol=1e-11)

