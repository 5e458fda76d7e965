# Claims C1-C7: a measured verdict for each, from whatever runs the config draws.


rule claims:
    input:
        runs=run_json(ALL_RUNS),
        config=ancient(job_config()),
    output:
        md="results/claims.md",
        json="results/claims.json",
        provenance="results/claims.provenance.json",
        html=report(
            "results/claims.html",
            caption="../report/claims.rst",
            category="Claims",
            labels={"table": "Measured verdicts on the paper's claims"},
        ),
        metrics="results/claims.metrics.json",
    log:
        "results/logs/claims.log",
    # On the submitting host, never a compute node (which may be offline; see the SLURM profile).
    localrule: True
    shell:
        "rankbias claims --config {input.config} --runs results/runs"
        " --md {output.md} --json {output.json} --html {output.html}"
        " --metrics {output.metrics} --provenance {output.provenance} > {log} 2>&1"
