# Training: one job per pack. A pack's runs train together as one batched model;
# the job writes results/runs/<run_id>/ for every member.
#
# Snakemake outputs cannot be computed from a wildcard, so each pack gets its own
# rule (train_<pack_id>) whose outputs are its members' run.json files. The pack
# file and the dataset files are `ancient`: a pack file's content never changes
# under its name, and the data is verified against published checksums, so a newer
# timestamp on either (a `dvc pull`, a fresh checkout, a fetch) is no reason to
# retrain. The dataset's manifest is no input: it records the files, training does not
# read it, so a rewritten manifest retrains nothing.

from rankbias.cluster import estimate_seconds


def _train_rule(pid):
    specs = PLAN.pack_specs(pid)
    resources_ = dict(runtime=pack_runtime(pid), mem_mb=pack_mem_mb(pid), **EXECUTION)
    if ON_GPU:
        resources_["gpu"] = 1

    rule:
        name:
            f"train_{pid}"
        input:
            pack=ancient(f"results/packs/{pid}.json"),
            data=ancient(dataset_inputs(specs[0].dataset)),
        output:
            run_json(PLAN.packs[pid]),
        log:
            f"results/logs/train/{pid}.log",
        # longest packs first: the last job to start should not be the longest one
        priority: round(estimate_seconds(specs, "cuda" if ON_GPU else "cpu", TIMINGS))
        threads: PLAN.config["train_threads"]
        resources:
            **resources_,
        params:
            pack=pid,
        shell:
            "OMP_NUM_THREADS={threads} rankbias train {input.pack} --out results/runs"
            " --checkpoint-dir results/packs/{params.pack} --checkpoint-every {resources.checkpoint_every}"
            " --data-dir data --device {resources.device} --graph {resources.graph}"
            " --deterministic {resources.deterministic}"
            " > {log} 2>&1"


for _pid in PACKS:
    _train_rule(_pid)
