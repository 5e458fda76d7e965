# Figures: one job per paper figure and per summary figure (figR, figS), drawn from
# the stored runs only. Ranks are read off the stored spectra with the config's `rank`
# settings (a params change redraws the figures and never retrains).


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
    log:
        "results/logs/figures/{fig}.log",
    # On the submitting host, never a compute node (which may be offline; see the SLURM profile).
    localrule: True
    params:
        rank=lambda wildcards: PLAN.config["rank"],
        runs=lambda wildcards: figures.figure_runs(PLAN, wildcards.fig),
        config=RESOLVED_CONFIG,
    shell:
        "rankbias figure {wildcards.fig} --config {params.config} --runs results/runs"
        " --out {output.png} > {log} 2>&1"
