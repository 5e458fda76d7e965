# Claims C1-C7: a measured verdict for each, from whatever runs the config draws.


rule claims:
    input:
        run_json(ALL_RUNS),
    output:
        md=report("results/claims.md", caption="../report/claims.rst", category="Claims"),
        json="results/claims.json",
        provenance="results/claims.provenance.json",
    params:
        rank=PLAN.config["rank"],
        thresholds=PLAN.config["claims"],
        runs=ALL_RUNS,
        config=RESOLVED_CONFIG,
    log:
        "results/logs/claims.log",
    shell:
        "rankbias claims --config {params.config} --runs results/runs --out results/claims"
        " > {log} 2>&1"
