# Datasets: find (or download) the raw files, verify their md5 and copy them into
# data/<name>/ with a manifest. Training reads them from data/.


rule data:
    output:
        "data/{dataset}/manifest.json",
    log:
        "results/logs/data/{dataset}.log",
    # On the submitting host, never a compute node (which may be offline; see the SLURM profile).
    localrule: True
    shell:
        "rankbias data fetch --dataset {wildcards.dataset} --dest data > {log} 2>&1"
