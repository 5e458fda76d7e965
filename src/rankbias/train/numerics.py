"""The numerical policy a training job runs under: deterministic kernels and fp32.

On CUDA, cuDNN picks convolution algorithms by speed, some of them nondeterministic
(atomics), and runs convolutions in TF32 on Ampere and newer. Two runs of one conv pack
then differ after a few steps, a resumed run is not byte-identical, and the CUDA-graph
check (engine.choose_stepper) sees the graph and the eager step disagree. So by default
(`deterministic: true`, precision fp32) every job sets, before CUDA starts:
  * CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS's deterministic workspace; read when the
    first cuBLAS handle is made, so it must be in the environment before that);
  * torch.use_deterministic_algorithms(True): an op with no deterministic CUDA kernel
    raises, and `explain` names it;
  * cudnn.deterministic = True, cudnn.benchmark = False;
  * TF32 off for matmuls and cuDNN (fp32); `precision: tf32`, a spec key since it
    changes results, opts in.
The CPU's kernels are deterministic already (resumes are byte-identical there), so on the
CPU only the precision flags, which the CPU ignores, are set.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rankbias.core.spec import PRECISIONS

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = ":4096:8"
_NONDETERMINISTIC = "does not have a deterministic implementation"


class NondeterministicOp(RuntimeError):
    """An op has no deterministic kernel on this device while `deterministic` is on."""


def prepare_environment(deterministic: bool) -> None:
    """Call before CUDA starts (the CLI does, first thing): cuBLAS reads its workspace
    setting when its first handle is made. A value the user set is kept."""
    if deterministic:
        os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def policy(deterministic: bool, precision: str, device_type: str) -> Iterator[dict]:
    """Run the block under the policy; the flags are put back afterwards, so one process
    may train packs of different precisions one after another. Yields `describe`'s
    record of what was set."""
    import torch
    _check_precision(precision)
    tf32 = precision == "tf32"
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        if device_type == "cuda" and deterministic:
            prepare_environment(True)
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        yield describe(deterministic, precision, device_type)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved[2:6]
        torch.set_float32_matmul_precision(saved[6])


def describe(deterministic: bool, precision: str, device_type: str, device=None) -> dict:
    """What run.json and the provenance record of the policy, and with `device` the
    GPU's name and its CUDA and cuDNN versions. `cpu_threads` is torch's intra-op thread
    count: on the CPU a pack's bytes depend on it (a matmul's sums split differently),
    so a run is reproduced bit for bit with the same count (the workflow gives every job
    `train_threads`, by OMP_NUM_THREADS)."""
    import torch
    out: dict = {"deterministic": bool(deterministic), "precision": precision,
                 "cpu_threads": torch.get_num_threads(),
                 "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                 "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                 "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
                 "torch": torch.__version__}
    if device_type == "cuda":
        out.update({"cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
                    "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                    CUBLAS_ENV: os.environ.get(CUBLAS_ENV)})
        if device is not None:     # the device's own facts (asking starts CUDA)
            out.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                        "cudnn": torch.backends.cudnn.version()})
    return out


def explain(err: BaseException, where: str) -> BaseException:
    """A RuntimeError from an op with no deterministic kernel, as one that says which
    op, where, and the way out; any other error unchanged."""
    msg = str(err)
    if isinstance(err, RuntimeError) and _NONDETERMINISTIC in msg:
        op = msg.split(_NONDETERMINISTIC)[0].strip().rstrip(",")
        return NondeterministicOp(
            f"{where}: {op} has no deterministic kernel on this device, and `deterministic` is "
            "on. Set `deterministic: false` in the config (or pass --nondeterministic) to allow "
            "it; runs are then not bit-reproducible.")
    return err
