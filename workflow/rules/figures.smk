# Figures: one job per paper figure and per summary figure (figR, figS), drawn from the stored runs only. Ranks are read
# off the stored spectra with the config's `rank` settings. Each figure reads its own
# config file (rank settings, defaults, its section), so changing the rank settings
# redraws every figure and never retrains, and changing one figure redraws that one.


rule figure:
    input:
        runs=figure_runs,
        config=lambda wildcards: ancient(job_config(wildcards.fig)),
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
    shell:
        "rankbias figure {wildcards.fig} --config {input.config} --runs results/runs"
        " --out {output.png} > {log} 2>&1"
