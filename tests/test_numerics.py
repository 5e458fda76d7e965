"""The numerical policy (rankbias.train.numerics): deterministic kernels and fp32 by default,
set before training and put back after, recorded in run.json and the provenance; the
`precision` spec key and the `deterministic` config key. On a CUDA device: a conv pack
and a ResNet-18 pack trained twice, and killed and resumed, are bit-identical."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import killed_and_resumed
from rankbias.train import numerics
from rankbias.plan import sweep
from rankbias.core.spec import RunSpec, SpecError
from rankbias.train.loop import train_pack

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())


def test_policy_sets_the_cuda_flags_and_puts_them_back(monkeypatch):
    monkeypatch.delenv(numerics.CUBLAS_ENV, raising=False)
    before = _flags()
    with numerics.policy(True, "fp32", "cuda") as rec:
        assert _flags() == (True, True, False, False, False, "highest")
        assert os.environ[numerics.CUBLAS_ENV] == numerics.CUBLAS_DETERMINISTIC
        assert rec["deterministic"] and rec["deterministic_algorithms"] and rec["precision"] == "fp32"
        assert not rec["tf32_matmul"] and not rec["tf32_cudnn"]
    assert _flags() == before
    with numerics.policy(True, "tf32", "cuda") as rec:
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert rec["tf32_matmul"] and rec["precision"] == "tf32"
    with numerics.policy(False, "fp32", "cuda"):     # opted out: no deterministic algorithms
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.allow_tf32
    with numerics.policy(True, "fp32", "cpu"):       # the CPU's kernels are deterministic already
        assert not torch.are_deterministic_algorithms_enabled()
    assert _flags() == before
    with pytest.raises(ValueError, match="precision: 'fp16' is not one of fp32, tf32"):
        with numerics.policy(True, "fp16", "cuda"):
            pass
    assert _flags() == before


def test_a_user_set_cublas_workspace_is_kept(monkeypatch):
    monkeypatch.setenv(numerics.CUBLAS_ENV, ":16:8")
    numerics.prepare_environment(True)
    assert os.environ[numerics.CUBLAS_ENV] == ":16:8"


def test_an_op_with_no_deterministic_kernel_is_named():
    # max_unpool has no deterministic kernel even on the CPU: the real error, explained
    x, idx = F.max_pool1d(torch.randn(1, 1, 8), 2, return_indices=True)
    with numerics.policy(True, "fp32", "cuda"):
        with pytest.raises(RuntimeError) as info:
            F.max_unpool1d(x, idx, 2)
    err = numerics.explain(info.value, "pack abc")
    assert isinstance(err, numerics.NondeterministicOp)
    assert "pack abc: max_unpooling2d_forward_out has no deterministic kernel" in str(err)
    assert "deterministic: false" in str(err)
    other = RuntimeError("something else")
    assert numerics.explain(other, "pack abc") is other


def test_precision_is_a_spec_key_that_keeps_fp32_run_ids():
    base = RunSpec(dataset="synthetic", arch="mlp", depth=1, width=8)
    assert "precision" not in base.to_dict()            # earlier runs keep their run_ids
    assert RunSpec.from_dict({**base.to_dict(), "precision": "fp32"}).run_id == base.run_id
    tf32 = RunSpec.from_dict({**base.to_dict(), "precision": "tf32"})
    assert tf32.run_id != base.run_id and tf32.to_dict()["precision"] == "tf32"
    assert tf32.pack_key() != base.pack_key()          # one precision per pack
    with pytest.raises(SpecError, match="precision: 'fp16' is not one of fp32, tf32"):
        RunSpec.from_dict({**base.to_dict(), "precision": "fp16"})


def test_deterministic_is_an_execution_key():
    assert sweep.resolve_config({})["deterministic"] is True
    assert "deterministic" in sweep.EXECUTION_KEYS      # switching it retrains nothing
    with pytest.raises(sweep.ConfigError, match="deterministic: expected true or false, got 'yes'"):
        sweep.resolve_config({"deterministic": "yes"})


def test_run_json_records_the_policy(synthetic, tmp_path):
    spec = RunSpec(dataset="synthetic", arch="mlp", depth=1, width=8, epochs=1, batch_size=256,
                   theory_batches=1)
    (run,) = train_pack([spec], tmp_path / "runs", device="cpu", dataset=synthetic, progress=False)
    rj = json.loads((run / "run.json").read_text())
    assert rj["numerics"]["deterministic"] is True and rj["numerics"]["precision"] == "fp32"
    assert rj["provenance"]["numerics"] == rj["numerics"]
    assert rj["numerics"]["torch"] == torch.__version__
    assert rj["numerics"]["cpu_threads"] == torch.get_num_threads()


def test_the_cpu_thread_count_is_recorded_as_it_was(synthetic, tmp_path):
    """On the CPU a pack's bytes can depend on torch's thread count, so run.json records
    the count the pack trained with, not a default."""
    spec = RunSpec(dataset="synthetic", arch="mlp", depth=1, width=8, epochs=1, batch_size=256,
                   theory_batches=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (run,) = train_pack([spec], tmp_path / "runs", device="cpu", dataset=synthetic, progress=False)
    finally:
        torch.set_num_threads(before)
    assert json.loads((run / "run.json").read_text())["numerics"]["cpu_threads"] == 1


def _on(ds, dev):
    return dataclasses.replace(ds, **{k: getattr(ds, k).to(dev) for k in ("x_train", "y_train", "x_test", "y_test")})


@CUDA
@pytest.mark.parametrize("model,K", [("CONV-BN-3-32", 2), ("RESNET-18", 2)])
def test_cuda_conv_packs_are_bit_reproducible(model, K, synthetic, tmp_path):
    """Twice from scratch and once killed and resumed: every stored file's bytes equal,
    with the step a CUDA graph (its check against the eager step passes)."""
    ds = _on(synthetic, torch.device("cuda"))
    # logged at epochs 0 and 2 only: a convolution's operator spectra, stored at every
    # logged epoch, are most of a small conv pack's time
    specs = [RunSpec.from_dict({"model": model, "dataset": "synthetic", "batch_size": 32, "epochs": 2,
                                "log_every": 2, "lr": 0.05, "seed": k, "theory_batches": 2})
             for k in range(K)]
    a, b = killed_and_resumed(specs, ds, tmp_path, kill_at=1, every=1, device="cuda")
    again = tmp_path / "again" / "runs"
    train_pack(specs, again, device="cuda", dataset=ds, progress=False)
    for spec in specs:
        runs = [json.loads((d / spec.run_id / "run.json").read_text()) for d in (a, b, again)]
        assert runs[0]["files"] == runs[1]["files"] == runs[2]["files"], spec.run_id
        assert runs[0]["step"].startswith("cuda-graph"), runs[0]["step"]
        num = runs[0]["numerics"]
        assert num["deterministic_algorithms"] and num["cudnn_deterministic"] and not num["tf32_cudnn"]
        assert num["gpu"] and num["cuda"] and num["cudnn"]
