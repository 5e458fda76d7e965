# Claims C1-C7: a measured verdict for each, from whatever runs the config draws.


rule claims:
    input:
        runs=run_json(ALL_RUNS),
        config=ancient(job_config()),
    output:
        md=report("results/claims.md", caption="../report/claims.rst", category="Claims"),
        json="results/claims.json",
        provenance="results/claims.provenance.json",
    log:
        "results/logs/claims.log",
    shell:
        "rankbias claims --config {input.config} --runs results/runs --out results/claims"
        " > {log} 2>&1"
