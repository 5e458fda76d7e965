# Datasets: find (or download) the raw files, verify their md5 and copy them into
# data/<name>/ with a manifest. Training reads them from data/ (and only from there).
#
# One rule per dataset, because each dataset has its own files and every file is an
# output. Every file is also an input of `rule all` (Snakemake does not remake a
# missing intermediate file whose consumers are up to date), so a file that is missing,
# e.g. moved aside by `rankbias restore`, makes the next `snakemake` fetch the dataset
# again. Sources ($RANKBIAS_DATA, the cache, the downloads) are read by this rule only.
# It runs on the submitting host, never a compute node (which may be offline; see the
# SLURM profile).


def _data_rule(name):
    files = dataset_outputs(name)

    rule:
        name:
            f"data_{name}"
        output:
            files,
        log:
            f"results/logs/data/{name}.log",
        localrule: True
        params:
            dataset=name,
        shell:
            "rankbias data fetch --dataset {params.dataset} --dest data > {log} 2>&1"


for _name in DATASETS:
    _data_rule(_name)
