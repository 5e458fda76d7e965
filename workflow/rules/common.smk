# Config -> run specs -> deduplicated runs -> packs, all at parse time.
#
# Pack files are written here, not by a rule, and only when missing or different.
# A pack's id is a hash of its members' run_ids, so the content under one name never
# changes: an unchanged config rewrites nothing (a second `snakemake` has nothing to
# do), and changing one run's hyperparameter gives its pack a new id (only that pack
# trains again). The resolved config (defaults filled in) is written the same way for
# the figure and claims commands.

import json
from pathlib import Path

from snakemake.utils import validate

from rankbias import figures, sweep
from rankbias.cluster import estimate_mem_mb, estimate_runtime_minutes

validate(config, "../schemas/config.schema.yaml")
try:
    PLAN = sweep.plan(config)
except sweep.SpecError as e:
    raise ValueError(f"invalid config: {e}") from None

RESOLVED_CONFIG = "results/config.resolved.json"
sweep.write_if_changed(RESOLVED_CONFIG, sweep.config_bytes(PLAN))
sweep.write_packs(PLAN, "results/packs")

FIGURES = figures.figure_names(PLAN)
ALL_RUNS = list(PLAN.specs)
PACKS = list(PLAN.packs)
DATASETS = sorted({s.dataset for s in PLAN.specs.values()})
ON_GPU = PLAN.config["device"] == "cuda"
# Settings that change how a training job runs, never its results: they reach
# `rankbias train` as resources, which (unlike params) are no rerun trigger, so
# changing them retrains nothing.
EXECUTION = {"device": PLAN.config["device"], "graph": str(PLAN.config["graph"])}


wildcard_constraints:
    pack="[0-9a-f]{12}",
    fig="|".join(figures.NAMES),
    dataset="|".join(DATASETS) or "none",


def run_json(run_ids):
    return [f"results/runs/{r}/run.json" for r in run_ids]


def pack_runtime(pid):
    """Job time limit in minutes (rankbias.cluster's conservative estimate)."""
    return estimate_runtime_minutes(PLAN.pack_specs(pid), "cuda" if ON_GPU else "cpu")


def pack_mem_mb(pid):
    """Host memory in MiB (rankbias.cluster's estimate)."""
    return estimate_mem_mb(PLAN.pack_specs(pid))


def figure_runs(wildcards):
    return run_json(figures.figure_runs(PLAN, wildcards.fig))


def figure_labels(wildcards):
    """Report labels, evaluated by `snakemake --report` only: the figure's name and this
    run's verdict and effect for each claim the figure shows (from results/claims.json).
    """
    from rankbias.claims import measured

    try:
        result = json.loads(Path("results/claims.json").read_text())
    except (OSError, ValueError):
        result = None
    return {
        "figure": f"Figure {wildcards.fig[3:]}",
        "measured": measured(result, wildcards.fig) if result else "claims not judged",
    }
