"""The tiny pipeline through a real SLURM cluster equals the same pipeline run locally.

A single-node cluster (munge, slurmctld, slurmd; tests/slurm/cluster.sh) is started for
the test and stopped after it. Snakemake submits every job with sbatch through the
executor plugin, using the project's SLURM profile (workflow/profiles/slurm) minus
what this machine lacks (Apptainer, GPUs). Both runs happen in fresh copies of the
repository, so nothing here touches the checkout's results/; the local one is conftest's
session-wide `tiny_pipeline`, the same build test_workflow checks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, ROOT, TEST_CONFIG, copy_repo, slurm_profile_without_apptainer

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
CANNOT_RUN = 3  # cluster.sh: "SLURM cannot run here"

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}{os.pathsep}/usr/sbin:/sbin"
    for key in [k for k in env if k.startswith("SLURM_")] + ["CUDA_VISIBLE_DEVICES"]:
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def slurm_cluster():
    if shutil.which("bash") is None:
        pytest.skip("SLURM integration test: bash is not available")
    if os.geteuid() != 0:
        pytest.skip("SLURM integration test: starting slurmctld, slurmd and munged needs root "
                    f"(running as uid {os.geteuid()})")
    start = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True,
                           env=_env(), timeout=300)
    if start.returncode == CANNOT_RUN:
        pytest.skip(f"SLURM integration test: {start.stderr.strip()}")
    try:
        assert start.returncode == 0, f"cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
        yield start.stdout
    finally:
        stop = subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True,
                              env=_env(), timeout=300)
        print(stop.stdout, stop.stderr)
        # the machine as it was found: a leftover slurm.conf naming the stopped controller
        # would make every later Snakemake start wait on `scontrol show config`
        if "slurm: wrote /etc/slurm/slurm.conf" in start.stdout:
            assert "slurm: removed /etc/slurm/slurm.conf" in stop.stdout, stop.stdout + stop.stderr
            assert not Path("/etc/slurm/slurm.conf").exists()


def _snakemake(workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "--configfile", TEST_CONFIG, *args]
    p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert p.returncode == 0, (f"{' '.join(cmd)} failed ({p.returncode}) in {workdir}:\n"
                               f"{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def _test_profile(workdir: Path) -> Path:
    """The SLURM profile as shipped, minus Apptainer and GPUs, which this machine lacks."""
    profile = slurm_profile_without_apptainer()
    profile["config"] = ["device=cpu"]
    # Poll often: the tiny jobs take seconds, not hours.
    profile["slurm-init-seconds-before-status-checks"] = 2
    profile["seconds-between-status-checks"] = 2
    profile["latency-wait"] = 10
    profile["retries"] = 0
    profile["slurm-no-account"] = True  # the test cluster has no accounts to guess from
    out = workdir / "test-profile"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out


def _runs(workdir: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in (workdir / "results" / "runs").glob("*/run.json")}


def test_pipeline_on_slurm_equals_local_run(slurm_cluster, tiny_pipeline, tmp_path):
    local, _ = tiny_pipeline  # the tiny pipeline run locally (--cores 2), shared with test_workflow
    cluster = copy_repo(tmp_path / "slurm")

    profile = _test_profile(cluster)
    _snakemake(cluster, "--workflow-profile", str(profile), "--jobs", "4",
                     "--slurm-status-command", "squeue")

    # The jobs really went through SLURM: one kept log per submitted job, named by its
    # SLURM job id, and slurmctld reports each of those jobs as completed.
    logs = sorted((cluster / "logs" / "slurm").rglob("*.log"))
    train_logs = [p for p in logs
                  if p.relative_to(cluster / "logs" / "slurm").parts[0].startswith("rule_train_")]
    assert train_logs, f"no SLURM logs of training jobs under {cluster / 'logs' / 'slurm'}"
    assert all(p.stem.isdigit() for p in logs), [p.name for p in logs]
    job_ids = {p.stem for p in logs}
    seen = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T"],
                          capture_output=True, text=True, env=_env()).stdout
    states = dict(line.split("|") for line in seen.split() if "|" in line)
    assert job_ids <= set(states), f"SLURM does not know jobs {sorted(job_ids - set(states))}"
    assert {states[j] for j in job_ids} == {"COMPLETED"}, {j: states[j] for j in job_ids}

    # Same runs, same numbers.
    _assert_same_runs(local, cluster)

    # The products drawn from those runs exist in both, and the claims agree.
    for rel in ("results/claims.json", "results/claims.md",
                *(f"results/figures/fig{i}.png" for i in range(1, 8))):
        assert (local / rel).is_file() and (cluster / rel).is_file(), rel
    lc, cc = (json.loads((d / "results/claims.json").read_text()) for d in (local, cluster))
    assert _verdicts(cc) == _verdicts(lc)


def _verdicts(claims: dict) -> list[tuple[str, str]]:
    """(id, verdict) of each claim, in order, from claims.json as rankbias.analysis.claims writes it:
    {"claims": [{"id": "C1", "verdict": ..., ...}, ...], ...}."""
    out = [(c["id"], c["verdict"]) for c in claims["claims"]]
    assert out and all(v in ("holds", "fails", "insufficient") for _, v in out), out
    return out


def _assert_same_runs(local: Path, cluster: Path) -> None:
    local_runs, cluster_runs = _runs(local), _runs(cluster)
    assert local_runs, "the local run trained nothing"
    assert sorted(cluster_runs) == sorted(local_runs)
    for run_id, ldir in local_runs.items():
        cdir = cluster_runs[run_id]
        lmeta, cmeta = (json.loads((d / "run.json").read_text()) for d in (ldir, cdir))
        assert cmeta["status"] == lmeta["status"] == "complete"
        assert cmeta["spec"] == lmeta["spec"]
        assert cmeta["epochs_completed"] == lmeta["epochs_completed"]
        lm, cm = (pd.read_parquet(d / "metrics.parquet") for d in (ldir, cdir))
        assert list(cm.columns) == list(lm.columns) and len(cm) == len(lm)
        for col in lm.columns:
            if pd.api.types.is_numeric_dtype(lm[col]) and not pd.api.types.is_bool_dtype(lm[col]):
                np.testing.assert_allclose(cm[col].to_numpy(float), lm[col].to_numpy(float),
                                           rtol=1e-5, atol=1e-7, equal_nan=True,
                                           err_msg=f"run {run_id}, metrics column {col}")
            else:
                assert cm[col].tolist() == lm[col].tolist(), f"run {run_id}, metrics column {col}"
        with np.load(ldir / "spectra.npz") as ls, np.load(cdir / "spectra.npz") as cs:
            assert sorted(cs.files) == sorted(ls.files)
            for key in ls.files:
                if ls[key].dtype.kind in "fc":
                    np.testing.assert_allclose(cs[key], ls[key], rtol=1e-5, atol=1e-7,
                                               err_msg=f"run {run_id}, spectra {key}")
                else:
                    np.testing.assert_array_equal(cs[key], ls[key], err_msg=f"run {run_id}, {key}")

