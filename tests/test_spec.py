"""Run specifications: validation, run_id stability, model names, packs (with hypothesis)."""
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankbias.core.pack import PackSpec, load_pack, make_packs, pack_id
from rankbias.core.spec import RunSpec, SpecError, model_name, parse_model_name

specs = st.builds(
    RunSpec,
    dataset=st.sampled_from(["mnist", "fashion_mnist", "cifar10", "synthetic"]),
    arch=st.sampled_from(["mlp", "mlp_bn", "res", "res_bn"]),
    depth=st.integers(1, 12), width=st.integers(1, 2048),
    loss=st.sampled_from(["ce", "mse"]),
    batch_size=st.integers(2, 4096), drop_last=st.booleans(),
    lr=st.floats(1e-6, 1, allow_nan=False), momentum=st.floats(0, 0.99),
    weight_decay=st.floats(0, 1e-1), epochs=st.integers(1, 500), seed=st.integers(0, 2**31),
    log_every=st.integers(1, 50), train_subset=st.integers(0, 60000),
)


@given(specs)
def test_round_trip_and_hash_stability(spec):
    d = spec.to_dict()
    again = RunSpec.from_dict(json.loads(json.dumps(d)))
    assert again == spec and again.run_id == spec.run_id
    # key order never matters
    assert RunSpec.from_dict(dict(reversed(list(d.items())))).run_id == spec.run_id
    assert len(spec.run_id) == 12 and int(spec.run_id, 16) >= 0


@given(specs, st.sampled_from(["lr", "weight_decay", "seed", "batch_size", "epochs", "width"]))
def test_changing_a_value_changes_run_id(spec, key):
    d = spec.to_dict()
    d[key] = d[key] + 1 if isinstance(d[key], int) else d[key] * 2 + 0.5
    assert RunSpec.from_dict(d).run_id != spec.run_id


@given(st.sampled_from(["mlp", "mlp_bn", "res", "res_bn"]), st.integers(1, 99), st.integers(1, 9999))
def test_model_names_parse_both_ways(arch, depth, width):
    assert parse_model_name(model_name(arch, depth, width)) == (arch, depth, width)


def test_paper_names():
    assert parse_model_name("MLP-BN-10-100") == ("mlp_bn", 10, 100)
    assert parse_model_name("RES-5-500") == ("res", 5, 500)
    assert RunSpec.from_dict({"model": "RES-BN-5-500"}).model == "RES-BN-5-500"


def test_run_id_is_pinned():
    """A stored result must stay addressable: the hash of the default spec never changes."""
    assert RunSpec().canonical_json() == (
        '{"arch":"mlp_bn","batch_size":32,"dataset":"mnist","depth":5,"drop_last":false,"epochs":20,'
        '"gamma":0.2,"log_every":1,"loss":"ce","lr":0.1,"milestones":[],"momentum":0.9,"schedule":"constant",'
        '"seed":0,"test_subset":0,"train_subset":0,"weight_decay":0.0005,"width":100}')
    assert RunSpec().run_id == RunSpec.from_dict({"lr": 1e-1, "weight_decay": 5e-4}).run_id


def test_int_and_float_spellings_are_one_run():
    assert RunSpec.from_dict({"lr": 1}).run_id == RunSpec.from_dict({"lr": 1.0}).run_id
    assert RunSpec.from_dict({"epochs": 3.0}).epochs == 3


@pytest.mark.parametrize("raw, key", [
    ({"arch": "cnn"}, "arch"), ({"model": "VGG-19"}, "model"), ({"dataset": "imagenet"}, "dataset"),
    ({"lr": -0.1}, "lr"), ({"lr": 0}, "lr"), ({"weight_decay": -1e-4}, "weight_decay"),
    ({"momentum": 1.0}, "momentum"), ({"batch_size": 0}, "batch_size"), ({"epochs": "10"}, "epochs"),
    ({"lr": "fast"}, "lr"), ({"lr": float("nan")}, "lr"), ({"depth": 2.5}, "depth"),
    ({"schedule": "cosine"}, "schedule"), ({"schedule": "multistep"}, "milestones"),
    ({"milestones": [5]}, "milestones"), ({"schedule": "multistep", "milestones": [5, 5]}, "milestones"),
    ({"batch_sise": 32}, "batch_sise"), ({"loss": "hinge"}, "loss"), ({"gamma": 0}, "gamma"),
    ({"model": "MLP-2-10", "depth": 3}, "depth"), ({"arch": "mlp_bn", "batch_size": 1}, "batch_size"),
    ({"seed": -1}, "seed"), ({"train_subset": -5}, "train_subset"), ({"seed": True}, "seed"),
    ({"drop_last": "no"}, "drop_last"), ({"drop_last": 0}, "drop_last"),
    # a milestone at or after the last epoch never drops the learning rate
    ({"schedule": "multistep", "milestones": [5, 20], "epochs": 20}, "milestones"),
    ({"schedule": "multistep", "milestones": [30], "epochs": 20}, "milestones"),
    # lr * weight_decay >= 1: the decay factor 1 - lr * weight_decay is no longer positive
    ({"weight_decay": 1e9}, "weight_decay"), ({"lr": 2.0, "weight_decay": 0.5}, "weight_decay"),
    ({"label_noise": -0.1}, "label_noise"), ({"label_noise": 1.0}, "label_noise"),
    ({"label_noise": "some"}, "label_noise"), ({"label_noise": float("nan")}, "label_noise"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(SpecError, match=key):
        RunSpec.from_dict(raw)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(SpecError) as e:
        RunSpec.from_dict({"learning_rate": 0.1})
    assert "learning_rate" in str(e.value) and "lr" in str(e.value)


def test_lr_schedule_is_multistep():
    """Milestones count epochs from 1: with (2, 4) the 2nd and 4th epochs (0-based 1
    and 3) are the first at the lower rates."""
    s = RunSpec(lr=0.1, schedule="multistep", milestones=(2, 4), gamma=0.5)
    assert [s.lr_at(e) for e in range(6)] == [0.1, 0.05, 0.05, 0.025, 0.025, 0.025]
    assert RunSpec(lr=0.1).lr_at(100) == 0.1


@pytest.mark.filterwarnings("ignore::UserWarning")       # step(epoch) is deprecated in torch
@pytest.mark.parametrize("milestones, epochs", [((60, 100, 200), 250), ((1, 2, 5), 8), ((3,), 4)])
def test_lr_schedule_is_the_authors_multistep_lr(milestones, epochs):
    """torch's MultiStepLR driven as the authors' train.py drives it: an SGD optimiser,
    then `scheduler.step(epoch)` before training each epoch = 1 .. EPOCH."""
    import torch
    spec = RunSpec(lr=0.1, schedule="multistep", milestones=milestones, gamma=0.2, epochs=epochs)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.2)
    theirs = []
    for epoch in range(1, epochs + 1):
        scheduler.step(epoch)
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
    ours = [spec.lr_at(e) for e in range(epochs)]
    assert ours == pytest.approx(theirs, rel=1e-12)
    if milestones == (60, 100, 200):
        assert [ours[e] for e in (58, 59, 98, 99, 198, 199)] == pytest.approx(
            [0.1, 0.02, 0.02, 0.004, 0.004, 0.0008], rel=1e-12)


def test_steps_per_epoch_keep_or_drop_the_partial_batch():
    """10,000 samples at B=32: 313 steps an epoch, the last of 16 samples, as a
    DataLoader keeps it; 312 with drop_last."""
    keep = RunSpec(dataset="mnist", train_subset=10000, batch_size=32, epochs=3)
    drop = RunSpec.from_dict({**keep.to_dict(), "drop_last": True})
    assert (keep.steps_per_epoch(), drop.steps_per_epoch()) == (313, 312)
    assert (PackSpec([keep]).steps, PackSpec([drop]).steps) == (939, 936)
    assert keep.steps_per_epoch(10) == -(-10 // 32) == 1
    assert RunSpec(batch_size=4).steps_per_epoch(10) == 3
    assert RunSpec(batch_size=5).steps_per_epoch(10) == RunSpec(batch_size=5, drop_last=True).steps_per_epoch(10) == 2


def test_a_last_batch_of_one_sample_is_refused_with_batchnorm():
    # synthetic: 1024 training samples = 341 * 3 + 1
    with pytest.raises(SpecError, match="batch_size: 3 leaves a last batch of 1.*drop_last: true"):
        RunSpec(dataset="synthetic", arch="mlp_bn", batch_size=3).check_sizes()
    RunSpec(dataset="synthetic", arch="mlp", batch_size=3).check_sizes()
    RunSpec(dataset="synthetic", arch="mlp_bn", batch_size=3, drop_last=True).check_sizes()


def test_packs_deduplicate_and_group():
    a = RunSpec(dataset="synthetic", batch_size=16, lr=0.1)
    b = RunSpec(dataset="synthetic", batch_size=16, lr=0.01)
    c = RunSpec(dataset="synthetic", batch_size=32, lr=0.1)
    d = RunSpec(dataset="synthetic", batch_size=16, lr=0.1, depth=3)
    e = RunSpec(dataset="synthetic", batch_size=16, lr=0.2, drop_last=True)
    packs = make_packs([a, b, c, d, e, a, b])
    assert sorted(len(p) for p in packs) == [1, 1, 1, 2]
    assert sum(len(p) for p in packs) == 5
    assert all(len({(s.batch_size, s.drop_last) for s in p}) == 1 for p in packs)
    assert pack_id([a, b]) == pack_id([b, a])
    assert [len(p) for p in make_packs([RunSpec(seed=i) for i in range(5)], max_pack=2)] == [2, 2, 1]


def test_load_pack_files(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"runs": [{"model": "MLP-2-8", "lr": 0.1}, {"model": "MLP-2-8", "lr": 0.2}]}))
    assert [s.lr for s in load_pack(good)] == [0.1, 0.2]
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("- {model: MLP-2-8, seed: 3}\n")
    assert load_pack(yaml_file)[0].seed == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"model": "MLP-2-8"}, {"model": "MLP-2-8", "lr": -1}]))
    with pytest.raises(SpecError, match=r"run 1: lr"):
        load_pack(bad)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"model": "MLP-2-8"}, {"model": "MLP-3-8"}]))
    with pytest.raises(SpecError, match="; depth differs, so they cannot train as one pack"):
        load_pack(mixed)
    two_batch_sizes = tmp_path / "b.json"
    two_batch_sizes.write_text(json.dumps([{"model": "MLP-2-8", "batch_size": 16}, {"model": "MLP-2-8"}]))
    with pytest.raises(SpecError, match="batch_size.*cannot train as one pack"):
        load_pack(two_batch_sizes)
    with pytest.raises(SpecError, match="does not exist"):
        load_pack(tmp_path / "missing.json")


def test_a_pack_that_lists_a_run_twice_is_refused_naming_the_file_and_the_run(tmp_path):
    """lr 1 and lr 1.0 are one run (one run_id): listed twice, it would train as K=2
    into one run directory."""
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"model": "MLP-2-8", "lr": 1}, {"model": "MLP-2-8", "seed": 1},
                                 {"model": "MLP-2-8", "lr": 1.0}]))
    rid = RunSpec.from_dict({"model": "MLP-2-8", "lr": 1}).run_id
    with pytest.raises(SpecError, match=rf"pack file {re.escape(str(twice))}: run {rid} is listed "
                                        r"twice \(runs 0 and 2\)"):
        load_pack(twice)
    # the one pack check refuses it wherever a pack is built
    s = RunSpec(dataset="synthetic")
    with pytest.raises(SpecError, match=f"Pack: run {s.run_id} is listed twice"):
        PackSpec([s, s], "Pack")


def test_a_pack_gives_what_its_members_share_and_refuses_what_they_do_not():
    a = RunSpec(dataset="synthetic", batch_size=16, lr=0.1, seed=1, theory_sizes=(4,))
    a_batches = a.theory_batches
    b = RunSpec(dataset="synthetic", batch_size=16, lr=0.2, seed=2, theory_sizes=(8, 4), theory_batches=a_batches + 8)
    pack = PackSpec([b, a])
    assert (pack.batch_size, pack.dataset, pack.model, pack.epochs) == (16, "synthetic", a.model, a.epochs)
    assert list(pack) == [b, a] and pack[1] is a and len(pack) == 2
    assert pack.id == pack_id([a, b]) and pack.run_ids == [b.run_id, a.run_id]
    assert pack.steps == a.epochs * a.steps_per_epoch() and pack.layer_table() == a.layer_table()
    # Theorem 1's sampling is per member: the pack measures every member's B* and most batches
    assert (pack.theory_batch_sizes, pack.theory_batches) == ((4, 8), a_batches + 8)
    with pytest.raises(AttributeError, match="'lr'.*per-member values are read off pack"):
        pack.lr
    assert PackSpec.of(pack) is pack and PackSpec.of([a, b]) == PackSpec([a, b])
    # what differs is named
    with pytest.raises(SpecError, match="here: .*; batch_size, drop_last differ, so they cannot train"):
        PackSpec([a, RunSpec(dataset="synthetic", batch_size=8, drop_last=True)], "here")
    with pytest.raises(SpecError, match="here: the pack has no runs"):
        PackSpec([], "here")


def test_direct_construction_hashes_like_the_config_path():
    """RunSpec(weight_decay=0) is the run a config's `weight_decay: 0` names."""
    direct = RunSpec(dataset="synthetic", weight_decay=0, lr=1)
    assert direct.weight_decay == 0.0 and isinstance(direct.lr, float)
    assert RunSpec.from_dict(direct.to_dict()).run_id == direct.run_id


@pytest.mark.parametrize("raw, key", [
    ({"dataset": "synthetic", "batch_size": 2048}, "batch_size"),
    ({"dataset": "mnist", "train_subset": 100, "batch_size": 128}, "batch_size"),
    ({"dataset": "mnist", "train_subset": 70000}, "train_subset"),
    ({"dataset": "cifar10", "test_subset": 20000}, "test_subset"),
])
def test_sizes_are_checked_before_training(raw, key):
    spec = RunSpec.from_dict(raw)
    with pytest.raises(SpecError, match=key):
        spec.check_sizes()


def test_the_last_useful_milestone_and_the_largest_decay_below_the_bound_are_accepted():
    assert RunSpec(schedule="multistep", milestones=(19,), epochs=20).lr_at(19) < RunSpec().lr
    RunSpec(lr=1.0, weight_decay=0.999)


def test_label_noise_is_left_out_at_zero_and_is_a_member_setting():
    """label_noise 0 (the default) leaves every earlier run_id as it was; any other value
    is a run of its own, in the same pack as its noiseless twin."""
    plain = RunSpec()
    assert RunSpec(label_noise=0.0).run_id == RunSpec.from_dict({"label_noise": 0}).run_id == plain.run_id
    assert "label_noise" not in plain.canonical_json() and "label_noise" not in plain.to_dict()
    noisy = RunSpec.from_dict({"label_noise": 0.2})
    assert noisy.run_id != plain.run_id and noisy.to_dict()["label_noise"] == 0.2
    assert RunSpec.from_dict(noisy.to_dict()) == noisy
    assert noisy.pack_key() == plain.pack_key() and len(make_packs([plain, noisy])) == 1
    with pytest.raises(SpecError, match=r"label_noise: must be in \[0, 1\).*got 1\.5"):
        RunSpec(label_noise=1.5)
