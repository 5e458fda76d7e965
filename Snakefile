# rankbias: config -> runs -> packs -> training -> figures and the claims table.
# The rules are one-line calls of the `rankbias` command; the logic is in the library.
# Quick profile: `snakemake` (config/config.yaml). Paper: --configfile config/paper.yaml.

import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version

from rankbias.core import timing

min_version("9.0")

# What every job's shell command carries itself (so a job on a SLURM node or in a container
# sees the same as a local one; parsing sets nothing in the environment): bash's strict
# mode (Snakemake's own prefix, which this one replaces); `rankbias` found beside the
# Python running Snakemake, so `.venv/bin/snakemake` works without activating the virtual
# environment (not in the project image, which has its own `rankbias` on its PATH); and
# $RANKBIAS_TIMING, the file each `rankbias` command appends its timing line to
# (rankbias.core.timing; `rankbias timing` reads it), unless the user set another.
_path = ""
if DeploymentMethod.APPTAINER not in workflow.deployment_settings.deployment_method:
    _bin = (
        shlex.quote(os.path.dirname(sys.executable))
        .replace("{", "{{")
        .replace("}", "}}")
    )
    _path = f'PATH={_bin}:"$PATH" '
shell.prefix(
    f"set -euo pipefail; export {_path}"
    f'{timing.ENV}="${{{{{timing.ENV}:-{timing.DEFAULT_LOG}}}}}"; '
)


# The quick profile is the default; a --configfile replaces it entirely (Snakemake would
# otherwise merge the two, and a paper or test config would inherit quick-profile runs).
# The library's loader reads it first, so a bad file is named before Snakemake's loader
# reports it without the file's name (--configfile files Snakemake reads before this).
from rankbias.plan import sweep

if not workflow.overwrite_configfiles:
    try:
        sweep.load_config("config/config.yaml")
    except sweep.SpecError as e:
        raise ValueError(f"invalid config: {e}") from None

    configfile: "config/config.yaml"


# With --sdm apptainer every job runs in the project image, pinned by digest (env
# RANKBIAS_CONTAINER=docker://<registry>/rankbias@sha256:<digest>) or the local rankbias.sif.
from rankbias.plan.image import container_image


container: container_image()


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/claims.smk"


rule all:
    default_target: True
    input:
        expand("results/figures/{fig}.png", fig=FIGURES),
        expand("results/figures/{fig}.pdf", fig=FIGURES),
        "results/claims.md",
        "results/claims.json",
        DATASET_FILES,


# `snakemake datasets` prepares every dataset the config uses (the DVC stage `data` runs it).
rule datasets:
    input:
        DATASET_FILES,
