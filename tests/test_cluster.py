"""Job time limits from a pack's work (rankbias.plan.cluster)."""
from __future__ import annotations

import math

import pytest

from rankbias.plan.cluster import (MIN_MINUTES, SAFETY_FACTOR, estimate_runtime_minutes,
                              estimate_seconds)
from rankbias.core.spec import RunSpec, SpecError


def pack(k=4, **kw):
    base = dict(dataset="cifar10", arch="mlp_bn", depth=10, width=100, batch_size=32, epochs=100)
    base.update(kw)
    return [RunSpec(seed=i, **base) for i in range(k)]


def test_limit_is_the_padded_estimate_in_whole_minutes():
    specs = pack(epochs=500, batch_size=8)
    seconds = estimate_seconds(specs, "cuda")
    assert estimate_runtime_minutes(specs, "cuda") == math.ceil(SAFETY_FACTOR * seconds / 60)
    assert estimate_runtime_minutes(specs) > MIN_MINUTES


def test_tiny_packs_get_the_minimum():
    specs = pack(dataset="synthetic", depth=2, width=16, epochs=3, batch_size=64)
    assert estimate_runtime_minutes(specs, "cpu") == MIN_MINUTES


def test_training_time_follows_the_step_count():
    # steps = epochs * steps_per_epoch: the per-step part of the estimate
    # scales with it exactly (startup and per-epoch work subtracted out).
    t1 = estimate_seconds(pack(epochs=1000, log_every=1000), "cuda")
    t2 = estimate_seconds(pack(epochs=2000, log_every=2000), "cuda")
    t4 = estimate_seconds(pack(epochs=4000, log_every=4000), "cuda")
    # both differences are 1000 and 2000 epochs of steps (each has two logged epochs)
    assert (t4 - t2) == pytest.approx(2 * (t2 - t1), rel=1e-9)


def test_more_work_never_takes_less_time():
    base = estimate_seconds(pack(), "cuda")
    assert estimate_seconds(pack(epochs=200), "cuda") > base
    assert estimate_seconds(pack(k=8), "cuda") > base
    assert estimate_seconds(pack(width=500), "cuda") > base
    assert estimate_seconds(pack(depth=20), "cuda") > base
    assert estimate_seconds(pack(batch_size=8), "cuda") > base
    assert estimate_seconds(pack(train_subset=5000), "cuda") < base
    assert estimate_seconds(pack(), "cpu") > base


def test_the_partial_batch_costs_one_step_and_its_samples():
    # 50,000 / 32: 1562 full batches and a last one of 16 samples, kept by default
    from rankbias.plan.cluster import COST_MODELS, OPS_PER_LAYER_STEP, _matrices, step_flops
    keep = pack(epochs=1000, log_every=1000)
    drop = pack(epochs=1000, log_every=1000, drop_last=True)
    shapes = _matrices(keep[0])
    cost = COST_MODELS["cuda"]
    one_more_step = (step_flops(keep) * 16 / 32 / cost.flops_per_second
                     + OPS_PER_LAYER_STEP * len(shapes) * cost.seconds_per_op)
    assert estimate_seconds(keep, "cuda") - estimate_seconds(drop, "cuda") == pytest.approx(
        1000 * one_more_step, rel=1e-9)


def test_batch_count_uses_the_train_size_or_subset():
    # 50000 / 32 and 5000 / 32 steps per epoch: 1563 vs 157.
    full = estimate_seconds(pack(epochs=1000, log_every=1000), "cpu")
    sub = estimate_seconds(pack(epochs=1000, log_every=1000, train_subset=5000), "cpu")
    assert full > 5 * sub


def test_errors_name_the_problem():
    with pytest.raises(SpecError, match="no runs"):
        estimate_runtime_minutes([])
    with pytest.raises(SpecError, match="device: 'tpu'"):
        estimate_runtime_minutes(pack(), "tpu")
    with pytest.raises(SpecError, match="cannot train as one pack"):
        estimate_runtime_minutes(pack(k=1) + pack(k=1, epochs=5))


def test_estimates_use_the_input_size_the_data_layer_delivers(synthetic):
    from rankbias.plan.cluster import _matrices
    spec = RunSpec(dataset="synthetic", arch="mlp", depth=2, width=16)
    assert _matrices(spec)[0] == (16, synthetic.x_train.shape[1])
    # MNIST-family images are padded to 32x32 (rankbias.train.data), so 1024 inputs, not 784
    assert _matrices(RunSpec(dataset="mnist", arch="mlp", depth=2, width=16))[0] == (16, 1024)


def test_memory_estimate_counts_data_and_pack():
    from rankbias.plan.cluster import estimate_mem_mb
    one = RunSpec(dataset="cifar10", arch="mlp", depth=2, width=2000)
    # 2 GiB base + twice (CIFAR-10 as float32: 60,000 x 3072 x 4 B = 703 MiB, and
    # weights, grads and momentum: 3 x 4 B x 10.2M = 117 MiB)
    assert 3600 < estimate_mem_mb([one]) < 3750
    sixty_four = [RunSpec.from_dict({**one.to_dict(), "seed": k}) for k in range(64)]
    assert estimate_mem_mb(sixty_four) > estimate_mem_mb([one]) + 64 * 2 * 12 * 2000 * 3072 // 2**20 // 2


def test_step_cost_by_hand_for_a_small_mlp():
    """MLP-BN-2-16 on synthetic inputs (D), K=3 members, B=32 (a pack's members share
    their batch size): matrices (16, D), (16, 16), (10, 16)."""
    from rankbias.plan.cluster import step_bytes, step_flops
    from rankbias.core.spec import DATASET_DIMS
    D = DATASET_DIMS["synthetic"]
    specs = [RunSpec(dataset="synthetic", arch="mlp_bn", depth=2, width=16, batch_size=32, seed=i)
             for i in range(3)]
    # forward 2 per weight per example for all three; input gradient 2 for the last
    # two; weight gradient 2 for all three
    per_example = 2 * (16 * D + 256 + 160) + 2 * (256 + 160) + 2 * (16 * D + 256 + 160)
    assert step_flops(specs) == 3 * 32 * per_example
    # weights and biases, and BatchNorm's weight and bias after each hidden matrix
    P = (16 * D + 16) + (256 + 16) + (160 + 10) + 2 * (16 + 16)
    assert specs[0].layer_table().params == P
    # float64: 8 bytes; P read forward, 256 + 160 read again backward, P gradients
    # written, 5P by the update, 32 input rows of D read
    assert step_bytes(specs, itemsize=8) == 8 * 3 * (P + (256 + 160) + P + 5 * P + 32 * D)


@pytest.mark.parametrize("model", ["MLP-BN-2-16", "RES-2-16"])
def test_step_cost_matches_the_engine(model, synthetic):
    """Independent of the hand count: the parameters the engine stacks, and the matmul
    FLOPs torch's own counter sees in one real step of the engine."""
    from torch.utils.flop_counter import FlopCounterMode

    from rankbias.plan.cluster import step_flops
    from rankbias.train.engine import Pack
    specs = [RunSpec.from_dict({"dataset": "synthetic", "model": model, "batch_size": 32, "seed": i})
             for i in range(3)]
    pack = Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu")
    assert sum(p[0].numel() for p in pack.plist) == specs[0].layer_table().params
    counter = FlopCounterMode(display=False)
    with counter:
        pack.step(pack.epoch_plan(0).inputs(0))
    assert counter.get_total_flops() == step_flops(specs)


def test_roofline_is_the_slower_of_compute_and_memory():
    from rankbias.plan.cluster import roofline_seconds
    assert roofline_seconds(1e9, 1e6, 1e9, 1e9) == 1.0          # compute-bound
    assert roofline_seconds(1e6, 4e9, 1e9, 2e9) == 2.0          # memory-bound


def test_theorem_1s_measurement_is_counted_per_logged_epoch():
    """Each logged epoch measures Theorem 1 on theory_batches batches of each B*: the
    estimate grows by that work, in proportion to the batches and to B*."""
    from rankbias.plan.cluster import COST_MODELS, OPS_PER_LAYER_STEP, _matrices, step_flops
    few, many = pack(theory_batches=4, log_every=10), pack(theory_batches=36, log_every=10)
    specs, cost, shapes = few, COST_MODELS["cpu"], _matrices(few[0])
    svd = len(specs) * sum(cost.svd_seconds + 4.0 * max(o, i) * min(o, i) ** 2 / cost.svd_flops_per_second
                           for o, i in shapes)
    per_batch = (step_flops(specs) / cost.flops_per_second
                 + OPS_PER_LAYER_STEP * len(shapes) * cost.seconds_per_op + svd)
    logged = 100 // 10 + 1
    assert estimate_seconds(many, "cpu") - estimate_seconds(few, "cpu") == pytest.approx(
        logged * 32 * per_batch, rel=1e-9)
    wide = pack(theory_batches=4, log_every=10, theory_sizes=(32, 64))
    assert estimate_seconds(wide, "cpu") > estimate_seconds(few, "cpu")
