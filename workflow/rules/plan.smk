# One job writes what this parse planned: the config files and the pack files, all
# named by hashes of their content. They are `ancient` inputs of every job that reads
# them (a name never changes its content), so this job running again, because another
# config was planned meanwhile, retrains and redraws nothing.
rule plan:
    output:
        sorted({job_config(f) for f in JOB_CONFIGS}),
        [f"results/packs/{pid}.json" for pid in PACKS],
    log:
        "results/logs/plan.log",
    localrule: True
    params:
        config=json.dumps(JOB_CONFIGS[None], sort_keys=True, separators=(",", ":")),
    shell:
        "rankbias plan --config-json {params.config:q} --write-configs results/config"
        " --write-packs results/packs > {log} 2>&1"
