"""`rankbias train` and `rankbias bench` as a user runs them, bad input included."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MNIST_FILES, SHARED_MNIST, needs_mnist


def rankbias(*args, env=None, cwd=None):
    e = {**os.environ, "RANKBIAS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rankbias", *args], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=600)


def write_pack(path, runs):
    path.write_text(json.dumps({"runs": runs}))
    return path


TINY = {"dataset": "synthetic", "model": "MLP-BN-2-8", "epochs": 2, "batch_size": 64}


def test_train_writes_runs_and_shows_progress(tmp_path):
    pack = write_pack(tmp_path / "p.json", [dict(TINY, lr=0.1), dict(TINY, lr=0.05, seed=1)])
    r = rankbias("train", str(pack), "--out", str(tmp_path / "runs"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stderr and "mean rank" in r.stderr and "ETA" in r.stderr
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert sorted(os.listdir(tmp_path / "runs" / run)) == [
            "layers.parquet", "lemmas.parquet", "metrics.parquet", "run.json", "spectra.npz",
            "theory.parquet"]


def test_a_declared_output_training_does_not_write_fails_naming_it(tmp_path):
    """--expect-outputs (the train rule's declared outputs): what training wrote passes,
    a file it did not write fails the command, named, after training."""
    from rankbias.core.pack import load_pack
    pack = write_pack(tmp_path / "p.json", [TINY])
    run_json = tmp_path / "runs" / load_pack(pack)[0].run_id / "run.json"
    r = rankbias("train", str(pack), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 "--expect-outputs", str(run_json))
    assert r.returncode == 0, r.stderr
    ghost = tmp_path / "runs" / "0123456789ab" / "run.json"
    r = rankbias("train", str(pack), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 "--expect-outputs", str(run_json), str(ghost))
    assert r.returncode == 1, r.stderr
    assert f"1 declared output(s) were not written: {ghost}" in r.stderr and "Traceback" not in r.stderr


def test_a_declared_output_outside_out_fails_before_training(tmp_path):
    pack = write_pack(tmp_path / "p.json", [TINY])
    elsewhere = tmp_path / "elsewhere" / "run.json"
    r = rankbias("train", str(pack), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 "--expect-outputs", str(elsewhere))
    assert r.returncode == 1
    assert f"--expect-outputs {elsewhere}: not under --out {tmp_path / 'runs'}" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad, key", [({"model": "CNN-2-8"}, "model"), ({"arch": "transformer"}, "arch"),
                                      ({"lr": -0.1}, "lr"), ({"epochs": 0}, "epochs")])
def test_bad_spec_is_a_clear_error_and_writes_nothing(tmp_path, bad, key):
    pack = write_pack(tmp_path / "p.json", [TINY, {**TINY, **bad}])
    r = rankbias("train", str(pack), "--out", str(tmp_path / "runs"), "--device", "cpu")
    assert r.returncode == 1
    assert key in r.stderr and "run 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_device_is_named(tmp_path):
    pack = write_pack(tmp_path / "p.json", [TINY])
    r = rankbias("train", str(pack), "--out", str(tmp_path / "runs"), "--device", "tpu")
    assert r.returncode == 1 and "--device" in r.stderr
    assert not (tmp_path / "runs").exists()


def _mnist_pack(tmp_path):
    return write_pack(tmp_path / "p.json", [{"dataset": "mnist", "model": "MLP-2-8", "epochs": 1,
                                             "train_subset": 100, "test_subset": 50}])


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "data"
    (empty / "mnist").mkdir(parents=True)
    r = rankbias("train", str(_mnist_pack(tmp_path)), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 env={"RANKBIAS_DATA": str(empty), "RANKBIAS_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "mnist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


@needs_mnist
def test_checksum_mismatch_is_a_clear_error(tmp_path):
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    for f in MNIST_FILES:
        shutil.copy(SHARED_MNIST / f, d / f)
    raw = bytearray(gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] ^= 1
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    r = rankbias("train", str(_mnist_pack(tmp_path)), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 env={"RANKBIAS_DATA": str(tmp_path / "data"), "RANKBIAS_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "t10k-labels" in r.stderr and "md5" in r.stderr
    assert not (tmp_path / "runs").exists()


@needs_mnist
def test_train_on_real_mnist_subset(tmp_path):
    r = rankbias("train", str(_mnist_pack(tmp_path)), "--out", str(tmp_path / "runs"), "--device", "cpu",
                 env={"RANKBIAS_DATA": str(SHARED_MNIST.parent)})
    assert r.returncode == 0, r.stderr
    info = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    assert info["dataset"]["train_size"] == 100 and info["dataset"]["test_size"] == 50
    assert info["dataset"]["checksums"]["train-images-idx3-ubyte"] == "6bbc9ace898e44ae57da46a324031adb"


def test_bench_json(tmp_path):
    r = rankbias("bench", "--json", "--workload", "mlp", "conv", "--K", "1", "4", "--rounds", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert [(x["workload"], x["K"]) for x in out["results"]] == [
        ("MLP-BN-10-100", 1), ("MLP-BN-10-100", 4), ("CONV-BN-5-64", 1), ("CONV-BN-5-64", 4)]
    for x in out["results"]:
        assert x["engine"] > 0 and x["reference"] > 0
        # the ratio is printed to 2 decimals
        assert x["ratio"] == pytest.approx(x["engine"] / x["reference"], rel=0.02, abs=0.006)


def test_each_command_is_registered_by_the_module_named_for_it():
    import argparse
    import importlib

    from rankbias import cli

    for name, module in cli.SUBCOMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert list(sub.choices) == [name], module
    assert list(cli.build_parser()._subparsers._group_actions[0].choices) == list(cli.SUBCOMMANDS)


@pytest.mark.parametrize("args", [["figure", "--help"], ["claims", "--help"], ["audit", "--help"],
                                  ["timing", "--help"], ["plan", "--help"], ["restore", "--help"],
                                  ["publish", "--help"], ["export-crate", "--help"]])
def test_commands_that_read_stored_results_do_not_import_torch(args):
    """A figure, the claims, the audit and the rest read stored numbers only: their
    jobs start without torch's import (seconds and hundreds of MB each)."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('TORCH-LOADED' if 'torch' in sys.modules else 'TORCH-ABSENT'))\n"
            "from rankbias.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "TORCH-ABSENT" in p.stdout, p.stdout + p.stderr


def test_top_level_help_lists_every_command():
    r = rankbias("--help")
    assert r.returncode == 0
    from rankbias import cli
    for name in cli.SUBCOMMANDS:
        assert f"    {name}" in r.stdout, name
