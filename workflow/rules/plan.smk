# One job writes what this parse planned: the config files and the pack files, all
# named by hashes of their content. It reads the config this parse planned from the
# environment variable the parse set (RANKBIAS_PLANNED_CONFIG, as every SLURM job does),
# not from a command line of the whole config, and checks that it is the job config
# this parse planned (--expect-config, its digest). They are `ancient` inputs of every job that reads
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
        digest=sweep.config_digest(JOB_CONFIGS[None]),
    shell:
        "rankbias plan --config-env RANKBIAS_PLANNED_CONFIG --expect-config {params.digest}"
        " --write-configs results/config --write-packs results/packs > {log} 2>&1"
