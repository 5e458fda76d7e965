# Datasets: find (or download) the raw files, verify their md5 and copy them into
# data/<name>/ with a manifest. Training reads them from data/ (and only from there).
#
# One rule per dataset, because each dataset has its own files and every file is an
# output. Every file is also an input of `rule all` (Snakemake does not remake a
# missing intermediate file whose consumers are up to date), so a file that is missing,
# e.g. moved aside by `rankbias restore`, makes the next `snakemake` fetch the dataset
# again. Sources ($RANKBIAS_DATA, the cache, the downloads) are read by this rule only.


def dataset_outputs(name):
    return sorted({f"data/{name}/manifest.json", *dataset_inputs(name)})


DATASET_FILES = [f for name in DATASETS for f in dataset_outputs(name)]


def _data_rule(name):
    rule:
        name:
            f"data_{name}"
        output:
            dataset_outputs(name),
        log:
            f"results/logs/data/{name}.log",
        # On the submitting host, never a compute node (which may be offline; see the SLURM profile).
        localrule: True
        params:
            dataset=name,
        shell:
            "rankbias data fetch --dataset {params.dataset} --dest data > {log} 2>&1"


for _name in DATASETS:
    _data_rule(_name)


# `snakemake datasets` prepares every dataset the config uses (the DVC stage `data` runs it).
rule datasets:
    input:
        DATASET_FILES,
