"""The shipped profiles beside the quick one: the authors' logged settings and C6's.
Each plans as stated; a tiny variant of the authors' profile trains."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rankbias.plan import sweep
from rankbias.train.loop import train_pack

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("name", ["authors.yaml", "c6.yaml", "paperlite.yaml"])
def test_profile_satisfies_the_schema(name):
    from snakemake.utils import validate
    validate(_load(name), str(ROOT / "workflow/schemas/config.schema.yaml"))


SHIPPED = sorted(p.name for p in (ROOT / "config").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_plans(name, capsys):
    """`rankbias plan --config config/NAME` succeeds as shipped: the config loads, plans, and
    every pack fits the profile's device_memory_mb (sweep.check_device_memory)."""
    from rankbias.cli import main
    assert main(["plan", "--config", str(ROOT / "config" / name)]) == 0
    assert "unique run(s)" in capsys.readouterr().out


def test_a_profile_whose_packs_exceed_its_device_does_not_plan():
    """The check the test above relies on: the authors' profile on a 40 GB device is refused,
    naming the pack and the key."""
    assert {"authors.yaml", "c6.yaml", "config.yaml", "paper.yaml"} <= set(SHIPPED)
    cfg = {**_load("authors.yaml"), "device_memory_mb": 40960}
    with pytest.raises(sweep.ConfigError, match=r"pack 1e1f002a2f6b \(6 x MLP-5-10000 on cifar10\): "
                                                r"needs about 62625 MiB.*device_memory_mb = 40960"):
        sweep.check_device_memory(sweep.plan(cfg))


def test_authors_profile_plans_their_logged_settings():
    p = sweep.plan(_load("authors.yaml"))
    specs = list(p.specs.values())
    assert all(s.momentum == 0.0 for s in specs)
    assert p.config["rank"] == {"measure": "threshold", "normalise": "fro", "tol": 1e-3, "conv": "kernel"}
    logged = [s for s in specs if s.epochs == 500]
    assert logged and all(s.dataset == "cifar10" and s.schedule == "multistep"
                          and s.milestones == (60, 100, 200) and s.gamma == 0.2
                          and s.log_every == 10 and s.train_subset == 0 for s in logged)
    # The two main logged grids: lr x lambda x B of MLP-BN-10-100 and of MLP-5-500, 180 runs each.
    for model in ("MLP-BN-10-100", "MLP-5-500"):
        grid = {(s.lr, s.weight_decay, s.batch_size) for s in logged if s.model == model
                and s.weight_decay in (0.0, 1e-4, 2e-4, 4e-4, 8e-4, 6e-3)}
        assert len(grid) == 180, model
    wide = [s for s in logged if s.width >= 1000]
    assert len(wide) == 72 and min(s.batch_size for s in wide) == 1
    assert set(p.figures) == {"fig1", "fig2", "fig3", "fig5", "fig6"}   # no logged residual MLPs
    fig1 = [p.specs[r] for r in p.figures["fig1"]]
    assert {(s.epochs, s.batch_size, s.schedule) for s in fig1} == {(2000, 128, "constant")}


def test_tiny_authors_variant_trains(tmp_path, synthetic):
    """The authors' settings (momentum 0, MultiStepLR with gamma 0.2, sparse evaluation)
    scaled down: synthetic data, 4 epochs, milestones 2 and 3, evaluation every 2 epochs."""
    cfg = copy.deepcopy(_load("authors.yaml"))
    cfg["defaults"].update(dataset="synthetic", epochs=4, milestones=[2, 3], log_every=2)
    cfg["device"] = "cpu"
    cfg["figures"] = {"fig2": {**cfg["figures"]["fig2"], "model": "MLP-BN-2-8",
                               "grid": {"lr": [0.03, 0.1], "batch_size": [100]}}}
    cfg["extra"] = {}
    p = sweep.plan(cfg)
    (pid, ids), = p.packs.items()
    specs = p.pack_specs(pid)
    train_pack(specs, tmp_path, device="cpu", dataset=synthetic, progress=False)
    for s in specs:
        info = json.loads((tmp_path / s.run_id / "run.json").read_text())
        assert info["spec"]["momentum"] == 0.0 and info["diverged"] is None
        m = pd.read_parquet(tmp_path / s.run_id / "metrics.parquet").set_index("epoch")
        assert list(m.index[m["logged"]]) == [0, 2, 4]
        lrs = m.loc[1:, "lr"].tolist()       # two drops by gamma 0.2 within four epochs
        assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(s.lr)
        assert lrs[-1] == pytest.approx(s.lr * 0.2 ** 2)
        assert sorted(set(round(x / s.lr, 9) for x in lrs)) == [0.04, 0.2, 1.0]


def test_c6_profile_is_the_papers_fig6_setting():
    p = sweep.plan(_load("c6.yaml"))
    specs = [p.specs[r] for r in p.figures["fig6"]]
    assert {s.model for s in specs} == {"MLP-BN-10-100"}
    assert {s.batch_size for s in specs} == {16, 32, 64, 128}
    assert {s.lr for s in specs} == {0.0125, 0.025, 0.05, 0.1}
    assert {(s.weight_decay, s.momentum) for s in specs} == {(5e-4, 0.9)}


def test_paperlite_profile_has_100_epochs_3_seeds_everywhere_and_no_cifar10():
    """config/paperlite.yaml: every section's runs train >= 100 epochs with three seeds, on
    MNIST and Fashion-MNIST only (CIFAR-10 is switched on by editing the file), and the
    paper's claims each have a section that feeds them."""
    p = sweep.plan(_load("paperlite.yaml"))
    assert set(p.figures) == {"fig1", "fig2", "fig3", "fig4", "fig5", "fig6", "fig7", "figT1", "figT2"}
    assert set(p.groups) - set(p.figures) == {"full_batch_gd", "gd_stationary", "r3_label_noise"}
    for name, ids in p.groups.items():
        specs = [p.specs[r] for r in ids]
        assert specs and all(s.epochs >= 100 for s in specs), name
        assert {s.seed for s in specs} == {0, 1, 2}, name
        assert {s.dataset for s in specs} <= {"mnist", "fashion_mnist"}, name
    assert {s.dataset for s in p.specs.values()} == {"mnist", "fashion_mnist"}
    # the paper's architectures
    models = {s.model for s in p.specs.values()}
    assert {"MLP-5-2000", "MLP-BN-10-100", "MLP-10-100", "RES-BN-5-500", "MLP-5-500", "RES-5-500"} <= models
    # C7's full batch is the whole training subset, of at least the 1000 examples C7 judges
    fb = [p.specs[r] for r in p.groups["full_batch_gd"]]
    assert all(s.batch_size == s.sizes()[0] >= 1000 for s in fb)
    # R3's runs with label noise have twins without it (fig3's), weight decay 0 both
    r3 = [p.specs[r] for r in p.groups["r3_label_noise"]]
    assert {(s.weight_decay, s.label_noise) for s in r3} == {(0.0, 0.0), (0.0, 0.2), (0.0, 0.5)}
    assert {r for r in p.groups["r3_label_noise"] if not p.specs[r].label_noise} <= set(p.figures["fig3"])


def test_paperlite_cifar10_switches_on_by_a_dataset_list():
    """Adding cifar10 to a section's dataset list (as the file's comments say) plans."""
    cfg = _load("paperlite.yaml")
    cfg["figures"]["fig2"]["grid"]["dataset"] = ["mnist", "fashion_mnist", "cifar10"]
    p = sweep.plan(cfg)
    assert {p.specs[r].dataset for r in p.figures["fig2"]} == {"mnist", "fashion_mnist", "cifar10"}


@pytest.mark.slow
def test_gpu_workstation_profile_plans_cuda_jobs_one_per_gpu():
    """`--workflow-profile workflow/profiles/gpu` (a real `snakemake -n`): every training
    job on CUDA, deterministic, asking for one GPU of the `gpu` resource."""
    import subprocess
    import sys
    snakemake = Path(sys.executable).parent / "snakemake"
    p = subprocess.run([str(snakemake), "-n", "--workflow-profile", "workflow/profiles/gpu",
                        "--configfile", ".test/config.yaml"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    trains = [line for line in p.stdout.splitlines() if "rankbias train" in line]
    plan = sweep.plan_from_file(ROOT / ".test" / "config.yaml")
    assert len(trains) == len(plan.packs)
    assert all("--device cuda" in t and "--deterministic on" in t for t in trains)
    resources = [line for line in p.stdout.splitlines() if "resources:" in line and "device=cuda" in line]
    assert len(resources) == len(plan.packs) and all("gpu=1" in r for r in resources)
