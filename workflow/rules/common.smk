# Config -> run specs -> deduplicated runs -> packs, planned at parse time.
#
# Parsing writes nothing (dry runs, --lint, --report and the parse inside each SLURM
# job included): the files jobs read are outputs of rules. Each job reads a config
# file named by the hash of its content, results/config/<digest>.json, written by the
# `plan` rule from what this parse planned, so a dry run with another config, or an
# edit of the config file, cannot change what a planned job reads. A pack's id is a
# hash of its members' run_ids, so its file's content never changes under its name
# either: an unchanged config does nothing, and changing one run's hyperparameter gives
# its pack a new id (only that pack trains again).

import json
import os
from pathlib import Path

from snakemake.utils import validate

from rankbias.plan import sweep
from rankbias.plan.cluster import (
    estimate_mem_mb,
    estimate_runtime_minutes,
    load_timings,
)
from rankbias.core.datasets import dataset_files

# A job run by an executor plugin (each SLURM job) parses this file again, in
# Snakemake's remote mode, with the config files as they are by then; it takes the
# config the submitting Snakemake planned from the environment instead (sbatch exports
# it), so the job's inputs, commands and outputs are the planned ones.
PLANNED_CONFIG = "RANKBIAS_PLANNED_CONFIG"
if workflow.remote_exec and PLANNED_CONFIG in os.environ:
    PLAN = sweep.plan(json.loads(os.environ[PLANNED_CONFIG]))
else:
    # Snakemake's YAML loader keeps the last of two equal keys and expands aliases, and
    # its schema error prints the whole config; read each config file again with the
    # library's loader (sweep.load_config) and check the top-level keys first, so the
    # error names the file or key before anything renders or runs.
    try:
        for _configfile in workflow.configfiles:
            sweep.load_config(_configfile)
        sweep.check_top_level(config)
        validate(config, "../schemas/config.schema.yaml")
        PLAN = sweep.plan(config)
        sweep.check_device_memory(PLAN)
    except sweep.SpecError as e:
        raise ValueError(f"invalid config: {e}") from None
    os.environ[PLANNED_CONFIG] = json.dumps(PLAN.config, sort_keys=True)

# The config files jobs read (claims and packs: the job config; each figure: its own).
JOB_CONFIGS = sweep.job_configs(PLAN)


def job_config(figure=None):
    return f"results/config/{sweep.config_digest(JOB_CONFIGS[figure])}.json"


FIGURES = sweep.figure_names(PLAN)
ALL_RUNS = list(PLAN.specs)
PACKS = list(PLAN.packs)
DATASETS = sorted({s.dataset for s in PLAN.specs.values()})
ON_GPU = PLAN.config["device"] == "cuda"
# Per-shape GPU timings `make gpu-check` measured, where present: they set the training
# jobs' time limits and priorities in place of the cost model (rankbias.plan.cluster).
TIMINGS = load_timings() if ON_GPU else {}
# Settings that change how a training job runs, never its results: they reach
# `rankbias train` as resources, which (unlike params) are no rerun trigger, so
# changing them retrains nothing.
# (train_threads is the rule's `threads`; a resource is a number or a string, so
# `deterministic` goes as on/off.)
EXECUTION = {
    k: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
    for k, v in PLAN.config.items()
    if k in sweep.EXECUTION_KEYS and k != "train_threads"
}


wildcard_constraints:
    pack="[0-9a-f]{12}",
    fig="|".join(sweep.NAMES),


def run_json(run_ids):
    return [f"results/runs/{r}/run.json" for r in run_ids]


def dataset_inputs(name):
    """What training on dataset `name` reads: its files under data/<name>/."""
    return [f"data/{name}/{f}" for f in dataset_files(name)]


def pack_runtime(pid):
    """Job time limit in minutes (rankbias.plan.cluster's conservative estimate)."""
    return estimate_runtime_minutes(
        PLAN.pack_specs(pid), "cuda" if ON_GPU else "cpu", TIMINGS
    )


def pack_mem_mb(pid):
    """Host memory in MiB (rankbias.plan.cluster's estimate)."""
    return estimate_mem_mb(PLAN.pack_specs(pid))


def figure_runs(wildcards):
    return run_json(sweep.figure_runs(PLAN, wildcards.fig))


def figure_subcategory(wildcards):
    """The report's subcategory of a figure: its group (Paper figures, Theory, Summaries)."""
    return sweep.figure_group(wildcards.fig)


def figure_labels(wildcards, view="figure"):
    """Report labels, evaluated by `snakemake --report` only: the figure's name, this
    run's verdict and effect for each claim the figure shows (from results/claims.json),
    and which of the figure's two entries this is (`view`: the figure or its provenance
    page; the report shows a label with two values as a switch).
    """
    from rankbias.analysis.claims import measured

    try:
        result = json.loads(Path("results/claims.json").read_text())
    except (OSError, ValueError):
        result = None
    return {
        "figure": f"Figure {wildcards.fig[3:]}",
        "measured": measured(result, wildcards.fig) if result else "claims not judged",
        "view": view,
    }


def dataset_outputs(name):
    return sorted({f"data/{name}/manifest.json", *dataset_inputs(name)})


DATASET_FILES = [f for name in DATASETS for f in dataset_outputs(name)]
