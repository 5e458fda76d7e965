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

from rankbias.plan import progress
from rankbias.plan.cluster import estimate_seconds

# The log holds every line of a pack's training; the terminal gets a line per pack at least
# every 25 s (pack, epoch, loss, mean rank, ETA) through file descriptor 3, the terminal's
# stderr (`--progress-fd 3 3>&2`), and, as each pack finishes, the whole run's estimate.


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
            data=ancient(dataset_inputs(specs.dataset)),
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
            run_plan=progress.RUN_PLAN,
        shell:
            "OMP_NUM_THREADS={threads} rankbias train {input.pack} --out results/runs"
            " --expect-outputs {output} --run-plan {params.run_plan}"
            " --checkpoint-dir results/packs/{params.pack} --checkpoint-every {resources.checkpoint_every}"
            " --data-dir data --device {resources.device} --graph {resources.graph}"
            " --deterministic {resources.deterministic}"
            " --progress-fd 3 3>&2 > {log} 2>&1"


for _pid in PACKS:
    _train_rule(_pid)


def train_slots():
    """How many packs train at once: the cores over each job's threads, at most the
    GPUs given (--resources gpu=N); 1 where Snakemake does not say."""
    try:
        slots = max(1, int(workflow.cores) // int(PLAN.config["train_threads"]))
        gpus = workflow.global_resources.get("gpu") if ON_GPU else None
        gpus = getattr(gpus, "value", gpus)
        return min(slots, int(gpus)) if isinstance(gpus, int) and gpus > 0 else slots
    except Exception:
        return 1


# When jobs are about to run (never in a dry run, --lint or --report): the cost model's
# seconds of every pack still to train, printed as one estimate and written to the file
# each training job's command names (--run-plan, results/logs/run-plan.json), so a job
# on a SLURM node reads it too; each prints what is left when its pack is done.
onstart:
    _plan = progress.run_plan(
        {
            pid: (
                PLAN.packs[pid],
                estimate_seconds(
                    PLAN.pack_specs(pid), "cuda" if ON_GPU else "cpu", TIMINGS
                ),
            )
            for pid in PACKS
        },
        train_slots(),
        "results/runs",
    )
    progress.write_plan(_plan, progress.RUN_PLAN)
    if progress.start_line(_plan):
        print(progress.start_line(_plan), file=sys.stderr, flush=True)
