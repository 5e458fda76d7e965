import dataclasses
import faulthandler
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rankbias.train import data

# A test that hangs fails the run instead of stalling it: past TEST_LIMIT_S seconds the
# process names the test, prints every thread's stack and exits non-zero. The slowest
# tests (a real snakemake, SLURM or podman run) take a few minutes on two cores.
TEST_LIMIT_S = float(os.environ.get("RANKBIAS_TEST_LIMIT_S", "900"))


def _overran(item) -> None:
    nodeid = item.nodeid
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:   # the message goes to the terminal, not to the test's capture
        capture.suspend_global_capture(in_=False)
    print(f"\n{nodeid}: still running after {TEST_LIMIT_S:.0f} s (RANKBIAS_TEST_LIMIT_S); every thread's stack:",
          file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(3)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timer = threading.Timer(TEST_LIMIT_S, _overran, args=(item,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()


@pytest.fixture(scope="session")
def synthetic():
    return data.load("synthetic", "cpu")


@pytest.fixture(scope="session")
def synthetic64(synthetic):
    """The synthetic set in float64, for exact comparisons of engine and reference."""
    return dataclasses.replace(synthetic, x_train=synthetic.x_train.double(),
                               x_test=synthetic.x_test.double())


def sgd_references(specs, ds):
    """Each member's plain reference (`rankbias.train.reference.ReferenceRun`: nn.Module
    and torch.optim.SGD in the dataset's dtype) at the start of epoch 0, for stepping
    beside a pack."""
    from rankbias.train.reference import ReferenceRun

    refs = [ReferenceRun(spec, ds.x_train, ds.y_train, ds.num_classes) for spec in specs]
    for ref in refs:
        ref.start_epoch(0)
    return refs


def step_references(refs, t: int) -> None:
    """Step t of every member's reference (`sgd_references`): its own mini-batch of its
    own data order and labels, and torch.optim.SGD's step."""
    for ref in refs:
        ref.step(*ref.batch(t))


def steps_equal_reference(specs, ds, steps, rtol=1e-10, atol=1e-11):
    """`steps` engine steps of a pack against each member's nn.Module + torch.optim.SGD on the
    same mini-batches: every parameter, BatchNorm statistic and stored matrix equal."""
    from rankbias.train import models
    from rankbias.train.engine import Pack

    pack = Pack(specs, ds.x_train, ds.y_train, ds.num_classes, "cpu")
    plan = pack.epoch_plan(0)
    refs = sgd_references(specs, ds)
    for t in range(steps):
        pack.step(plan.inputs(t))
        step_references(refs, t)
    for k, net in enumerate(ref.net for ref in refs):
        for name, p in net.named_parameters():
            np.testing.assert_allclose(pack.params[name][k].detach().numpy(), p.detach().numpy(),
                                       rtol=rtol, atol=atol, err_msg=f"member {k} {name}")
        buffers = [(n, b) for n, b in net.named_buffers() if not n.endswith("num_batches_tracked")]
        assert {n for n, _ in buffers} == set(pack.running)
        for name, b in buffers:
            np.testing.assert_allclose(pack.running[name][k].numpy(), b.numpy(), rtol=rtol, atol=atol,
                                       err_msg=f"member {k} {name}")
        for name, kind, w in models.matrices(net):
            np.testing.assert_allclose(pack.weight(name)[k].detach().numpy(), w.detach().numpy(),
                                       rtol=rtol, atol=atol, err_msg=f"member {k} matrix {name}")


def killed_and_resumed(specs, ds, root: Path, kill_at: int, every: int, after_kill=None,
                       device: str = "cpu"):
    """Train `specs` uninterrupted into root/a/runs, and into root/b/runs killed (an
    exception from the epoch hook) at epoch `kill_at` with checkpoints every `every`
    epochs, then resumed; `after_kill(out)` looks at root/b between. Returns both run
    directories."""
    from rankbias.train.loop import train_pack

    class Killed(Exception):
        pass

    def kill(epoch):
        if epoch == kill_at:
            raise Killed

    a, b = root / "a" / "runs", root / "b" / "runs"
    train_pack(specs, a, device=device, dataset=ds, progress=False)
    with pytest.raises(Killed):
        train_pack(specs, b, device=device, dataset=ds, progress=False, checkpoint_every=every, on_epoch=kill)
    if after_kill is not None:
        after_kill(b)
    train_pack(specs, b, device=device, dataset=ds, progress=False, checkpoint_every=every)
    return a, b


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------
# Shared by the integration tests (test_workflow, test_slurm, test_dvc, test_containers)
# and the data tests (test_data, test_cli). Plain helpers are imported with
# `from conftest import ...` (tests/ is on sys.path under pytest's default import mode).

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEST_CONFIG = ".test/config.yaml"
SLURM_PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
# Outputs and caches that a copy of the repository must not carry over.
NOT_COPIED = ("results/", "data/", ".snakemake/", ".dvc/cache/", ".dvc/tmp/")

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# The verified MNIST copy: $RANKBIAS_DATA/mnist when set (.ci/run sets it), else the
# shared copy beside the checkout.
SHARED_MNIST = Path(os.path.abspath(Path(os.environ["RANKBIAS_DATA"]) / "mnist" if os.environ.get("RANKBIAS_DATA")
                                    else ROOT.parent / "shared" / "datasets" / "mnist"))
HAVE_MNIST = all((SHARED_MNIST / f).is_file() for f in MNIST_FILES)
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST,
    reason=f"the verified MNIST copy is not at {SHARED_MNIST} (set RANKBIAS_DATA or put it in ../shared/datasets)")


def copy_repo(dest: Path) -> Path:
    """The repository's files (tracked, plus new files git does not ignore) copied into
    `dest`, without outputs or caches (NOT_COPIED)."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    files = [f for f in listing.decode().split("\0") if f]
    assert "Snakefile" in files and TEST_CONFIG in files, "the repository copy lacks the workflow"
    for rel in files:
        src = ROOT / rel
        if rel.startswith(NOT_COPIED) or not (src.is_file() or src.is_symlink()):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():   # profiles -> workflow/profiles
            os.symlink(os.readlink(src), dest / rel)
        else:
            shutil.copy2(src, dest / rel)
    return dest


def slurm_profile_without_apptainer() -> dict:
    """The SLURM profile as shipped, minus Apptainer, which the test machines lack."""
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    assert isinstance(profile, dict) and profile["executor"] == "slurm"
    profile.pop("software-deployment-method")
    profile.pop("apptainer-args")
    return profile


def planned_jobs(dry_run: str) -> dict[str, int]:
    """Job counts from the (last) 'Job stats' table of `snakemake -n` output; {} when it
    says there is nothing to be done. Output with neither is an error, not {}."""
    if "Nothing to be done" in dry_run:
        return {}
    assert "Job stats:" in dry_run, f"no 'Job stats' table in the dry run:\n{dry_run[-3000:]}"
    counts, total = {}, None
    for line in dry_run.split("Job stats:")[-1].splitlines()[1:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            continue
        if m.group(1) == "total":
            total = int(m.group(2))
            break
        counts[m.group(1)] = int(m.group(2))
    assert counts and total == sum(counts.values()), f"unreadable 'Job stats' table:\n{dry_run[-3000:]}"
    return counts


def snakemake(wd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`snakemake --cores 2 ARGS` in `wd` as a user runs it: `.venv/bin/snakemake` with the
    venv NOT on PATH (the Snakefile finds `rankbias` beside its own interpreter)."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=os.pathsep.join(path), RANKBIAS_OFFLINE="1")
    if HAVE_MNIST:   # the verified copy, also where it was found beside the checkout
        env.setdefault("RANKBIAS_DATA", str(SHARED_MNIST.parent))
    p = subprocess.run([str(BIN / "snakemake"), "--cores", "2", *args], cwd=wd, env=env,
                       capture_output=True, text=True, timeout=1200)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The tiny config's whole pipeline, run once locally in a copy of the repository:
    (copy, snakemake's log). Shared by test_workflow and test_slurm; tests must not change
    its results/."""
    wd = copy_repo(tmp_path_factory.mktemp("tiny_pipeline"))
    p = snakemake(wd, "--configfile", TEST_CONFIG)
    return wd, p.stdout + p.stderr
