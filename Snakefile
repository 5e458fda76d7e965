# rankbias: config -> runs -> packs -> training -> figures and the claims table.
# The rules are one-line calls of the `rankbias` command; the logic is in the library.
# Quick profile: `snakemake` (config/config.yaml). Paper: --configfile config/paper.yaml.

import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# Rules call the `rankbias` command; find it beside the Python running Snakemake, so
# `.venv/bin/snakemake` works without activating the virtual environment.
os.environ["PATH"] = (
    os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
)


envvars:
    "PATH",


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
