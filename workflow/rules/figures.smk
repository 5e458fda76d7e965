# Figures: one job per paper figure and per summary figure (figR, figS), drawn from the stored runs only. Ranks are read
# off the stored spectra with the config's `rank` settings. Each figure reads its own
# config file (rank settings, defaults, its section), so changing the rank settings
# redraws every figure and never retrains, and changing one figure redraws that one.
# In the report each figure sits in its group's subcategory (rankbias.plan.sweep.GROUPS) with
# its provenance page beside it: one row per figure, the label `view` switches between them.


rule figure:
    input:
        runs=figure_runs,
        config=lambda wildcards: ancient(job_config(wildcards.fig)),
    output:
        png=report(
            "results/figures/{fig}.png",
            caption="../report/figure.rst",
            category="Figures",
            subcategory=figure_subcategory,
            labels=figure_labels,
        ),
        pdf="results/figures/{fig}.pdf",
        provenance="results/figures/{fig}.provenance.json",
        page=report(
            "results/figures/{fig}.provenance.html",
            caption="../report/provenance.rst",
            category="Figures",
            subcategory=figure_subcategory,
            labels=lambda wildcards: figure_labels(wildcards, view="provenance"),
        ),
    log:
        "results/logs/figures/{fig}.log",
    # On the submitting host, never a compute node (which may be offline; see the SLURM profile).
    localrule: True
    shell:
        "rankbias figure {wildcards.fig} --config {input.config} --runs results/runs"
        " --out {output.png} --pdf {output.pdf} --provenance {output.provenance}"
        " --page {output.page} > {log} 2>&1"
