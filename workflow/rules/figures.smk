# Figures: one job per paper figure, drawn from the stored runs only. Ranks are read
# off the stored spectra with the config's `rank` settings (a params change redraws
# the figures and never retrains).

import json
from pathlib import Path


def figure_labels(wildcards):
    """Report labels, evaluated by `snakemake --report` only: the figure's name and this
    run's verdict and effect for each claim the figure shows (from results/claims.json)."""
    from rankbias.claims import measured

    try:
        result = json.loads(Path("results/claims.json").read_text())
    except (OSError, ValueError):
        result = None
    return {
        "figure": f"Figure {wildcards.fig[3:]}",
        "measured": measured(result, wildcards.fig) if result else "claims not judged",
    }


rule figure:
    input:
        figure_runs,
    output:
        png=report(
            "results/figures/{fig}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels=figure_labels,
        ),
        pdf="results/figures/{fig}.pdf",
        provenance=report(
            "results/figures/{fig}.provenance.json",
            caption="../report/provenance.rst",
            category="Figures",
            subcategory="Provenance",
            labels=lambda wildcards: {"figure": f"Figure {wildcards.fig[3:]}"},
        ),
    params:
        rank=lambda wildcards: PLAN.config["rank"],
        runs=lambda wildcards: PLAN.groups[wildcards.fig],
        config=RESOLVED_CONFIG,
    log:
        "results/logs/figures/{fig}.log",
    shell:
        "rankbias figure {wildcards.fig} --config {params.config} --runs results/runs"
        " --out {output.png} > {log} 2>&1"
