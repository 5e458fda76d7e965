"""Every model family: the batched engine against its plain nn.Module + torch.optim.SGD
reference, names, plan-time shape checks, resume, bad input."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import killed_and_resumed, steps_equal_reference

from rankbias.store import metrics as M
from rankbias.core import families, spec as spec_mod
from rankbias.train import models
from rankbias.train.engine import Pack
from rankbias.train.models import build_net
from rankbias.train.reference import train_reference
from rankbias.store.results import Run
from rankbias.core.spec import RunSpec, SpecError, model_name, parse_model_name
from rankbias.train.loop import train_pack


def _members(model, batch=(4, 4, 4), **extra):
    """Three members that differ in lr, weight decay, momentum and seed."""
    base = dict(dataset="synthetic", model=model, epochs=2, log_every=1, **extra)
    hyper = [(0.05, 0.0, 0.9), (0.02, 5e-4, 0.9), (0.01, 1e-3, 0.5)]
    return [RunSpec.from_dict({**base, "batch_size": b, "lr": lr, "weight_decay": wd, "momentum": mom,
                               "seed": k})
            for k, (b, (lr, wd, mom)) in enumerate(zip(batch, hyper))]


def _subset(ds, n_train, n_test):
    return dataclasses.replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                               x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


@pytest.mark.parametrize("model,extra", [
    ("CONV-BN-1-6", {}), ("CONV-2-6", {"activation": "leaky_relu"}), ("CONV-BN-0-4", {"bias": False}),
    ("MLP-WN-2-16", {}), ("MLP-WN-2-16", {"bias": False, "activation": "leaky_relu"}),
    ("RES-BN-2-8", {"activation": "leaky_relu", "bias": False})])
def test_small_families_step_like_torch_sgd_float64(model, extra, synthetic64):
    """Full batches, and a whole epoch of B=7 on 96 samples: 13 full steps and a last
    step of the 5 samples left over (each member's own)."""
    ds = _subset(synthetic64, 96, 8)
    steps_equal_reference(_members(model, **extra), ds, steps=6)
    steps_equal_reference(_members(model, batch=(7, 7, 7), **extra), ds, steps=14)


@pytest.mark.parametrize("model,size", [("VGG-16", 32), ("RESNET-18", 8)])
def test_large_families_step_like_torch_sgd_float64(model, size, synthetic64, monkeypatch):
    """ResNet-18 pools globally, so it trains on 8x8 images here (16x less work)."""
    monkeypatch.setitem(spec_mod.DATASET_SHAPES, "synthetic", (3, size, size))
    ds = _subset(synthetic64, 16, 4)
    ds = dataclasses.replace(ds, x_train=ds.x_train[:, :3 * size * size].contiguous())
    steps_equal_reference(_members(model, batch=(2, 2, 2)), ds, steps=3, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("model", ["CONV-BN-1-6", "MLP-WN-2-16"])
def test_pack_matches_reference_run_float64(model, synthetic64, tmp_path):
    """Over two epochs: losses, accuracies and every matrix's spectrum (a kernel
    reshaped [out, in*kh*kw]) equal the plain run's, the spectra to numpy's SVD."""
    ds = _subset(synthetic64, 64, 32)
    specs = _members(model)
    train_pack(specs, tmp_path / "runs", device="cpu", dataset=ds, progress=False)
    for spec in specs:
        run = Run(tmp_path / "runs" / spec.run_id)
        _, hist = train_reference(spec, ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.num_classes)
        m = run.metrics.set_index("epoch")
        kinds = dict(run.layers.drop_duplicates("layer")[["layer", "kind"]].itertuples(index=False))
        for e, row in enumerate(hist):
            for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
                np.testing.assert_allclose(m.loc[e, key], row[key], rtol=1e-9, atol=1e-12)
            for i, name in enumerate(run.layer_names):
                if kinds[name] == "conv_operator":
                    continue                               # below
                ref = row["matrices"][name].numpy()
                if kinds[name] == "conv":
                    assert ref.ndim == 2 and ref.shape[1] > 6   # in * kh * kw
                sv_ref = np.linalg.svd(ref, compute_uv=False)
                np.testing.assert_allclose(run.spectra[f"sv_{i}"][e], sv_ref, rtol=0,
                                           atol=1e-9 * sv_ref.max(), err_msg=f"{name} epoch {e}")
        assert run.mean_rank().notna().all()
        # each convolution's operator spectrum: the stored kernel's, by the FFT method, on the
        # input size the model's layer table gives, at the layer's stride
        convs = {layer.name: layer for layer in spec.layer_table().layers if layer.kind == "conv"}
        net = build_net(spec, ds.input_dim, ds.num_classes)
        paths = {name: path for name, kind, path in models.matrix_paths(net) if kind == "conv"}
        names = list(run.layer_names)
        for name, layer in convs.items():
            module = net.get_submodule(paths[name])
            i = names.index(f"{name}:operator")
            for e, row in enumerate(hist):
                kernel = row["matrices"][name].reshape(module.weight.shape)
                want = M.conv_operator_singular_values(kernel, layer.input_size, module.stride[0]).numpy()
                np.testing.assert_allclose(run.spectra[f"sv_{i}"][e], want, rtol=0, atol=1e-9 * want.max())
        if convs:
            assert run.hidden_ranks(conv="operator")[0].notna().all()


def test_conv_resume_after_kill_equals_uninterrupted(synthetic, tmp_path):
    ds = _subset(synthetic, 64, 16)
    specs = [dataclasses.replace(s, epochs=3) for s in _members("CONV-BN-1-6")]
    first, out = killed_and_resumed(specs, ds, tmp_path, kill_at=2, every=1)
    for spec in specs:
        a, b = Run(first / spec.run_id), Run(out / spec.run_id)
        assert a.metrics.equals(b.metrics) and a.layers.equals(b.layers)
        for k in a.spectra:
            np.testing.assert_array_equal(a.spectra[k], b.spectra[k])


# -- names, sizes and shapes -------------------------------------------------------------

@pytest.mark.parametrize("name,parsed", [
    ("CONV-BN-5-64", ("conv_bn", 5, 64)), ("conv-3-32", ("conv", 3, 32)), ("VGG-16", ("vgg16", 16, 64)),
    ("resnet-18", ("resnet18", 18, 64)), ("MLP-WN-10-100", ("mlp_wn", 10, 100)),
    ("MLP-BN-10-100", ("mlp_bn", 10, 100))])
def test_new_names_parse_both_ways(name, parsed):
    assert parse_model_name(name) == parsed
    assert parse_model_name(model_name(*parsed)) == parsed
    assert RunSpec.from_dict({"model": name}).model == model_name(*parsed)


@pytest.mark.parametrize("dataset", spec_mod.DATASETS)
@pytest.mark.parametrize("model", ["CONV-BN-5-64", "VGG-16", "RESNET-18", "MLP-WN-3-32"])
def test_every_family_plans_on_every_dataset(model, dataset):
    spec = RunSpec.from_dict({"model": model, "dataset": dataset})
    table = spec.layer_table()
    layers, params = table.layers, table.params
    assert params > 0 and layers[-1].name == "out" and layers[-1].kind == "output"
    channels = spec_mod.DATASET_SHAPES[dataset][0]
    if model != "MLP-WN-3-32":
        first = layers[0]
        assert first.kind == "conv" and first.input_size == (32, 32) and first.shape[1] % channels == 0


def test_layers_give_conv_input_sizes():
    layers = RunSpec.from_dict({"model": "CONV-BN-2-8", "dataset": "mnist"}).layer_table().layers
    assert [(l.kind, l.shape, l.input_size) for l in layers] == [
        ("conv", (8, 1 * 2 * 2), (32, 32)), ("conv", (8, 8 * 2 * 2), (16, 16)),
        ("conv", (8, 8 * 9), (8, 8)), ("conv", (8, 8 * 9), (8, 8)), ("output", (10, 8 * 8 * 8), None)]
    vgg = RunSpec.from_dict({"model": "VGG-16", "dataset": "cifar10"}).layer_table().layers
    assert sum(l.kind == "conv" for l in vgg) == 13 and vgg[-1].shape == (10, 512)
    resnet = RunSpec.from_dict({"model": "RESNET-18", "dataset": "cifar10"}).layer_table()
    assert sum(l.kind == "conv" for l in resnet.layers) == 20      # 1 + 16 + 3 shortcuts
    assert 11_000_000 < resnet.params < 11_300_000                 # ResNet-18's 11.2M parameters


def _traced_table(arch, depth, width, bias, image_shape, classes=10):
    """The layer table read off the module itself: one forward pass on the meta device
    (no memory, no arithmetic), hooks recording what every module sees and gives."""
    import math
    with torch.device("meta"):
        net = models.build(arch, depth, width, "relu", bias, image_shape, classes)
        n, seen, largest = 7, {}, [0]

        def hook(module, inputs, output):
            if inputs and inputs[0].dim() and inputs[0].shape[0] == n:   # not a weight-norm parametrisation
                seen[module] = (tuple(inputs[0].shape), tuple(output.shape))
                largest.append(math.prod(output.shape[1:]))

        handles = [m.register_forward_hook(hook) for m in net.modules() if m is not net]
        try:
            net(torch.empty(n, math.prod(image_shape)))
        except RuntimeError:
            return None                                     # the model does not fit
        finally:
            for h in handles:
                h.remove()
        found = []
        for name, kind, path in models.matrix_paths(net):
            m = net.get_submodule(path)
            (in_shape, out_shape), shape = seen[m], tuple(models.matrix(m).shape)
            positions = math.prod(out_shape[2:]) if kind == "conv" else 1
            found.append(families.Layer(name, kind, shape, tuple(in_shape[2:]) if kind == "conv" else None,
                                        shape[0] * shape[1] * positions))
        return families.LayerTable(tuple(found), sum(p.numel() for p in net.parameters()), max(largest))


_SIZES = {"mlp": [(1, 5), (3, 16)], "mlp_bn": [(2, 7)], "mlp_wn": [(1, 4), (3, 9)], "res": [(1, 6), (2, 3)],
          "res_bn": [(2, 5)], "conv": [(0, 3), (2, 5)], "conv_bn": [(0, 4), (3, 6)],
          "vgg16": [(16, 64)], "resnet18": [(18, 64)]}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("arch", families.ARCHS)
def test_layer_table_equals_the_module_itself(arch):
    """The torch-free table the planner reads equals what the module's own forward pass
    gives, for every family (a new family without a table, or a table that drifts from
    its module, fails here), on image shapes that fit and that do not."""
    assert set(families.ARCHS) == set(_SIZES)
    shapes = [(1, 32, 32), (3, 32, 32), (1, 28, 28), (3, 9, 13), (2, 3, 8), (1, 2, 2)]
    if arch in ("vgg16", "resnet18"):
        shapes = [(3, 32, 32), (1, 40, 36), (3, 28, 28), (3, 16, 16), (1, 64, 64), (3, 5, 7)]
    for depth, width in _SIZES[arch]:
        for shape in shapes:
            for bias in (True, False):
                want = _traced_table(arch, depth, width, bias, shape)
                if want is None:
                    with pytest.raises(families.ModelError, match="does not fit"):
                        families.layers(arch, depth, width, bias, shape, 10)
                else:
                    assert families.layers(arch, depth, width, bias, shape, 10) == want, (depth, width, shape, bias)


@pytest.mark.parametrize("raw,key", [
    ({"model": "CONVX-2-8"}, "model"), ({"model": "VGG-17"}, "model"), ({"model": "RESNET-34"}, "model"),
    ({"model": "MLP-0-10"}, "depth"), ({"model": "CONV-2-0"}, "width"),
    ({"arch": "vgg16", "depth": 5, "width": 100}, "depth"), ({"activation": "tanh"}, "activation"),
    ({"bias": "yes"}, "bias"), ({"model": "VGG-16", "batch_size": 1}, "batch_size")])
def test_bad_model_input_names_the_key(raw, key):
    with pytest.raises(SpecError, match=rf"^{key}\b|{key}:"):
        RunSpec.from_dict(raw)


def test_conv_model_on_images_that_do_not_fit_fails_at_plan_time(monkeypatch):
    monkeypatch.setitem(spec_mod.DATASET_SHAPES, "synthetic", (3, 16, 16))
    with pytest.raises(SpecError, match=r"model: VGG-16 does not fit 3x16x16 inputs.*synthetic"):
        RunSpec.from_dict({"model": "VGG-16", "dataset": "synthetic"}).check_sizes()
    RunSpec.from_dict({"model": "RESNET-18", "dataset": "synthetic"}).check_sizes()  # pools globally


def test_conv_model_on_data_of_the_wrong_shape(synthetic):
    spec = RunSpec.from_dict({"model": "CONV-BN-1-4", "dataset": "synthetic"})
    with pytest.raises(models.ModelError, match="expects synthetic's 3x32x32 inputs"):
        Pack([spec], synthetic.x_train[:, :1024], synthetic.y_train, 10, "cpu")


def test_new_keys_leave_earlier_run_ids_alone():
    assert RunSpec(activation="relu", bias=True).run_id == RunSpec().run_id
    assert RunSpec(activation="leaky_relu").run_id != RunSpec().run_id
    assert RunSpec(bias=False).run_id != RunSpec().run_id
    assert RunSpec(bias=False).pack_key() != RunSpec().pack_key()


def test_weight_norm_matrix_is_the_effective_weight():
    net = models.build("mlp_wn", 2, 8, "relu", True, (1, 4, 4), 10)
    fc = net.hidden["fc1"]
    with torch.no_grad():
        fc.parametrizations.weight.original0.mul_(3.0)
    w = dict((n, w) for n, _, w in models.matrices(net))["fc1"]
    v = fc.parametrizations.weight.original1
    torch.testing.assert_close(w, 3.0 * v)          # g started at ||V||_F, W at V
    assert M.rank(M.singular_values(w).numpy()) == 8


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_hand_loss_gradient_is_autograds_bit_for_bit(loss, dtype):
    """weighted_loss_and_grad (the chain step's) against autograd through
    weighted_loss (the autograd step's) and through loss_fn with the weighting written
    out, a zero weight (a frozen member) included."""
    from rankbias.train.models import loss_fn, weighted_loss, weighted_loss_and_grad
    g = torch.Generator().manual_seed(3)
    K, B, C = 3, 7, 10
    logits = torch.randn(K, B, C, dtype=dtype, generator=g) * 3
    y = torch.randint(0, C, (K, B), generator=g)
    w = torch.tensor([1.0, 0.0, 1.0], dtype=dtype)
    got, grad = weighted_loss_and_grad(loss, logits, y, w)
    leaf = logits.clone().requires_grad_(True)
    want = loss_fn(loss, leaf.flatten(0, 1), y.flatten(), "none").view(K, -1).mean(1) * w
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    assert torch.equal(got, want.detach()) and torch.equal(grad, want_grad)
    leaf2 = logits.clone().requires_grad_(True)
    via = weighted_loss(loss, leaf2, y, w)
    (via_grad,) = torch.autograd.grad(via.sum(), leaf2)
    assert torch.equal(got, via.detach()) and torch.equal(grad, via_grad)
    assert not grad[1].any() and grad[0].abs().sum() > 0


def _tiny(depth, width, bias, shape, classes):
    """The docs' example (docs/add-a-model.md): TINY-L-W, L 3x3 conv-BN-activation layers
    of width W, global pooling, a linear head."""
    layers, c = [], shape[0]
    for _ in range(depth):
        layers += families.conv_bn_act(c, width, bias, bn=True)
        c = width
    return families.image_net(shape, families.seq(*layers, families.Part("avgpool")),
                              families.linear(width, classes, bias))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_family_declared_once_plans_builds_and_steps(monkeypatch):
    """A family added in one place (its declaration and registry entry) gets a layer
    table equal to its built module's forward pass, and the built module trains."""
    monkeypatch.setitem(families.FAMILIES, "tiny", families.Family("tiny", "TINY", _tiny, images=True, batchnorm=True))
    families.layers.cache_clear()
    try:
        assert families.parse_model_name("tiny-3-8") == ("tiny", 3, 8)
        table = families.layers("tiny", 3, 8, True, (3, 16, 16), 10)
        assert table == _traced_table("tiny", 3, 8, True, (3, 16, 16))
        assert [(l.name, l.kind, l.shape) for l in table.layers] == [
            ("features.0", "conv", (8, 27)), ("features.3", "conv", (8, 72)), ("features.6", "conv", (8, 72)),
            ("out", "output", (10, 8))]
        torch.manual_seed(0)
        net = models.build("tiny", 3, 8, "relu", True, (3, 16, 16), 10)
        assert sum(p.numel() for p in net.parameters()) == table.params
        # one plain SGD step on the module built from the declaration, not from a RunSpec
        # (the family is no RunSpec's), so not the reference loop (rankbias.train.reference)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.randn(4, 3 * 16 * 16), torch.tensor([0, 1, 2, 3])
        before = models.loss_fn("ce", net(x), y)
        before.backward()
        opt.step()
        assert models.loss_fn("ce", net(x), y) < before
    finally:
        families.layers.cache_clear()
