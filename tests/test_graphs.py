"""The CUDA-graph step: what the CPU can check of it, and the real thing where CUDA is.

A captured graph replays its kernels on the same memory with whatever the input
buffers hold, so three things must be true, and are tested here on the CPU:
the step reads nothing back to the host (op by op, forward and backward); running the
step on static buffers refilled each step equals the plain step bit for bit; and the
check that guards the graph (engine.choose_stepper) catches a replay that reads stale
inputs. A fake torch.cuda (capture records, replay runs) walks the capture path's
Python, a failed capture included. The CUDA tests capture a real graph and run only
where CUDA is.
"""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rankbias.train import engine
from rankbias.train.engine import GraphedStep, Pack, StaticStep, choose_stepper
from rankbias.store.results import Run
from rankbias.core.spec import RunSpec
from rankbias.train.loop import train_pack

# Ops that read a device value on the host (a sync that capture forbids), or make a
# tensor from host data inside the step.
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select",
              "unique", "_unique2", "equal", "allclose", "lift_fresh", "tolist"}


# The synthetic set's 1024 samples: B=32 cuts them into whole batches; B=100 leaves a
# partial last batch of 24, a narrower step that the graph path runs eagerly.
BATCHES = pytest.mark.parametrize("batch", [32, 100], ids=["whole", "partial"])


def _specs(model, batch=100, epochs=2, k=3):
    base = dict(dataset="synthetic", model=model, epochs=epochs, log_every=1, batch_size=batch)
    return [RunSpec.from_dict({**base, "lr": 0.05 * (i + 1), "weight_decay": 5e-4 * i,
                               "momentum": 0.9 - 0.2 * i, "seed": i}) for i in range(k)]


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", ["MLP-BN-3-16", "RES-BN-2-16", "MLP-2-16"])
@BATCHES
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("by_hand", [True, False], ids=["chain", "autograd"])
def test_step_reads_nothing_back_to_the_host(model, batch, loss, by_hand, synthetic):
    specs = [RunSpec.from_dict({**s.to_dict(), "loss": loss}) for s in _specs(model, batch)]
    pack = Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu",
                differentiation="auto" if by_hand else "autograd")
    assert (pack.chain is not None) == by_hand
    plan = pack.epoch_plan(0)
    for t in (1, plan.steps - 1):                  # a full step, and the epoch's last
        s = plan.inputs(t)
        with _OpLog() as log:
            pack.step(s)
        assert "bmm" in log.ops, "the backward pass was not observed"
        assert log.ops.count("_fused_sgd_") == pack.K, "the SGD update was not observed"
        assert not HOST_READS & set(log.ops), f"host reads in step {t}: {sorted(HOST_READS & set(log.ops))}"


def _state(pack):
    return [t.clone() for t in pack.snapshot()]


@BATCHES
def test_static_buffer_step_equals_plain_step_bitwise(batch, synthetic):
    specs = _specs("RES-BN-2-16", batch)
    a = Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu")
    b = Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu")
    b._stepper, b.step_mode = choose_stepper(b, b.epoch_plan(0), "auto", stepper=StaticStep)
    assert b.step_mode == "static-buffers" and isinstance(b._stepper, StaticStep)
    for epoch in range(2):       # b's epochs go through StaticStep.run, a's step by step
        plan_a = a.epoch_plan(epoch)
        a.loss_sum.zero_()
        for t in range(plan_a.steps):
            a.step(plan_a.inputs(t))
        b.train_epoch(epoch)
    for x, y in zip(_state(a), _state(b)):
        assert torch.equal(x, y)


class _StaleIndices(StaticStep):
    """A broken replay: it never refreshes the sample indices."""

    def __call__(self, s):
        s = engine.StepInputs(**{f: getattr(s, f) for f in engine.StepInputs.__slots__})
        s.idx = self.static.idx.clone()
        super().__call__(s)


class _StaleLr(StaticStep):
    """A broken replay: the learning rate it captured stays, whatever the schedule says."""

    def __call__(self, s):
        s = engine.StepInputs(**{f: getattr(s, f) for f in engine.StepInputs.__slots__})
        s.neg_lr = self.static.neg_lr.clone()
        super().__call__(s)


class _OneMemberStands(StaticStep):
    """A broken replay: member 1, the slow one, never moves."""

    def __call__(self, s):
        s = engine.StepInputs(**{f: getattr(s, f) for f in engine.StepInputs.__slots__})
        s.neg_lr = s.neg_lr.clone()
        s.neg_lr[1] = 0
        super().__call__(s)


@pytest.mark.parametrize("broken", [_StaleIndices, _StaleLr, _OneMemberStands])
def test_the_check_rejects_a_replay_with_stale_inputs(broken, synthetic, monkeypatch):
    # member 1's updates are 5000x smaller than member 0's: checked member by member
    specs = [RunSpec.from_dict({**s.to_dict(), "lr": lr})
             for s, lr in zip(_specs("MLP-BN-2-16", 32), (0.5, 1e-4, 0.1))]
    pack = Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu")
    before = _state(pack)
    plan = pack.epoch_plan(0)
    if broken is _StaleLr:   # an lr that differs between the captured step and the next
        orig = plan.inputs

        def inputs(t):
            s = orig(t)
            s.neg_lr = s.neg_lr * (1 + t)
            return s
        plan.inputs = inputs
    step, mode = choose_stepper(pack, plan, "auto", stepper=broken)
    assert step == pack.step and "did not reproduce" in mode
    with pytest.raises(RuntimeError, match="does not reproduce"):
        choose_stepper(pack, plan, "on", stepper=broken)
    for x, y in zip(before, _state(pack)):
        assert torch.equal(x, y), "checking must leave the pack as it found it"


def test_graph_modes_on_the_cpu(synthetic, tmp_path):
    specs = _specs("MLP-2-16", 32, epochs=1)
    with pytest.raises(ValueError, match="graph: 'sometimes'"):
        Pack(specs, synthetic.x_train, synthetic.y_train, synthetic.num_classes, "cpu", graph="sometimes")
    with pytest.raises(RuntimeError, match="--graph on: CUDA graphs need a CUDA device"):
        train_pack(specs, tmp_path / "on", device="cpu", dataset=synthetic, progress=False, graph="on")
    train_pack(specs, tmp_path / "auto", device="cpu", dataset=synthetic, progress=False)
    info = Run(tmp_path / "auto" / specs[0].run_id).info
    assert info["step"] == "eager" and info["differentiation"] == "by hand (chain)"


def test_graph_mode_comes_from_the_flag_then_the_environment(monkeypatch):
    from rankbias.train.loop import graph_mode
    monkeypatch.delenv("RANKBIAS_GRAPH", raising=False)
    assert graph_mode(None) == "auto"
    monkeypatch.setenv("RANKBIAS_GRAPH", "off")
    assert graph_mode(None) == "off" and graph_mode("on") == "on"
    monkeypatch.setenv("RANKBIAS_GRAPH", "sometimes")
    with pytest.raises(ValueError, match="RANKBIAS_GRAPH: 'sometimes'"):
        graph_mode(None)


def test_a_restore_drops_gradients_left_by_a_step_cut_short(synthetic):
    pack = Pack(_specs("MLP-2-16", 32), synthetic.x_train, synthetic.y_train,
                synthetic.num_classes, "cpu")
    snap = pack.snapshot()
    pack.plist[0].grad = torch.ones_like(pack.plist[0])
    pack.restore(snap)
    assert all(p.grad is None for p in pack.plist)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@BATCHES
def test_cuda_graph_trains_like_the_eager_step(batch, synthetic, tmp_path):
    import dataclasses
    dev = torch.device("cuda")
    ds = dataclasses.replace(synthetic, **{k: getattr(synthetic, k).to(dev)
                                           for k in ("x_train", "y_train", "x_test", "y_test")})
    # an lr drop, and a member that diverges and is frozen mid-run
    specs = [RunSpec.from_dict({**s.to_dict(), "schedule": "multistep", "milestones": [2], "gamma": 0.1})
             for s in _specs("RES-BN-2-16", batch, epochs=4)]
    specs.append(RunSpec.from_dict({**specs[0].to_dict(), "lr": 1e4, "seed": 9}))
    train_pack(specs, tmp_path / "eager", device="cuda", dataset=ds, progress=False, graph="off")

    class Killed(Exception):
        pass

    def kill_at_2(epoch):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):     # and resumed: a fresh graph over the loaded state
        train_pack(specs, tmp_path / "graph", device="cuda", dataset=ds, progress=False, graph="on",
                   checkpoint_every=1, on_epoch=kill_at_2)
    train_pack(specs, tmp_path / "graph", device="cuda", dataset=ds, progress=False, graph="on",
               checkpoint_every=1)
    for spec in specs:
        e, g = Run(tmp_path / "eager" / spec.run_id), Run(tmp_path / "graph" / spec.run_id)
        assert g.info["step"] == "cuda-graph"
        assert bool(e.diverged) == bool(g.diverged)
        np.testing.assert_allclose(g.metrics["train_loss"], e.metrics["train_loss"], rtol=1e-4)
        for k in e.spectra:
            if k.startswith("sv_"):
                np.testing.assert_allclose(g.spectra[k], e.spectra[k], rtol=1e-3, atol=1e-5)


class _FakeCuda:
    """Just enough of torch.cuda, on the CPU, to run the capture path's control flow:
    a "captured" Pack.step is recorded, not run (as on a GPU), and replay runs it on
    the static buffers. It proves the Python of that path, not CUDA itself."""

    def __init__(self, monkeypatch, fail_capture=False):
        self.capturing, self.recorded, self.fail = False, None, fail_capture
        self.streams_set = []
        fake = self
        real_step = Pack.step

        def step(pack, s):
            if fake.capturing:
                fake.recorded = (pack, s)
                return None
            return real_step(pack, s)

        class Graph:
            def replay(self):
                real_step(*fake.recorded)

        class Capture:
            def __init__(self, g):
                pass

            def __enter__(self):
                fake.capturing = True

            def __exit__(self, *exc):
                fake.capturing = False
                if fake.fail:
                    raise RuntimeError("operation not permitted when stream is capturing")

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                import time
                self.t = time.perf_counter()

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return 1000 * (end.t - self.t)

        import contextlib
        self.stream0 = Stream()
        monkeypatch.setattr(Pack, "step", step)
        for name, value in dict(CUDAGraph=Graph, graph=Capture, Stream=Stream, Event=Event,
                                stream=lambda s: contextlib.nullcontext(),
                                device=lambda d: contextlib.nullcontext(),
                                current_stream=lambda device=None: fake.stream0,
                                set_stream=fake.streams_set.append).items():
            monkeypatch.setattr(torch.cuda, name, value)


def _pack_on_fake_cuda(synthetic, batch):
    pack = Pack(_specs("RES-BN-2-16", batch), synthetic.x_train, synthetic.y_train,
                synthetic.num_classes, "cpu")
    plan = pack.epoch_plan(0)
    pack.device = torch.device("cuda")     # only choose_stepper reads it from here on
    return pack, plan


@BATCHES
def test_capture_path_on_a_fake_cuda(batch, synthetic, monkeypatch):
    _FakeCuda(monkeypatch)
    pack, plan = _pack_on_fake_cuda(synthetic, batch)
    ref, ref_plan = _pack_on_fake_cuda(synthetic, batch)
    before = _state(pack)
    step, mode = choose_stepper(pack, plan, "auto")
    assert "ms/step" in mode, mode                      # captured, checked and timed
    for x, y in zip(before, _state(pack)):
        assert torch.equal(x, y), "choosing must leave the pack as it found it"
    step, mode = choose_stepper(pack, plan, "on")
    assert isinstance(step, GraphedStep) and mode == "cuda-graph"
    step.run(plan)
    for t in range(plan.steps):
        ref.step(ref_plan.inputs(t))
    for x, y in zip(_state(ref), _state(pack)):
        assert torch.equal(x, y)


def test_a_failed_capture_falls_back_cleanly(synthetic, monkeypatch):
    fake = _FakeCuda(monkeypatch, fail_capture=True)
    pack, plan = _pack_on_fake_cuda(synthetic, 32)
    before = _state(pack)
    step, mode = choose_stepper(pack, plan, "auto")
    assert step == pack.step and mode.startswith("eager (graph capture failed: RuntimeError")
    assert fake.streams_set == [fake.stream0], "the stream from before the capture is current again"
    assert all(p.grad is None for p in pack.plist)
    for x, y in zip(before, _state(pack)):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="--graph on: capturing the step failed"):
        choose_stepper(pack, plan, "on")
