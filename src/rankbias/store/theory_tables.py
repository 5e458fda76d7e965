"""The theory tables each run stores beside its spectra (written by
`rankbias.train.theory`, judged by `rankbias.analysis.theory_verdicts`): their file names and
columns."""
from __future__ import annotations

THEORY_FILE = "theory.parquet"
LEMMAS_FILE = "lemmas.parquet"
LEMMA1_SAMPLES = 8          # inputs whose per-sample gradients are checked, per stage

THEORY_COLUMNS = ["epoch", "layer", "index", "kind", "batch_size", "n_batches", "weight_decay",
                  "grad_rank_min", "grad_rank_max", "gnorm_min", "gnorm_median", "gnorm_max",
                  "left", "right", "ratio"]
LEMMA_COLUMNS = ["stage", "epoch", "lemma", "layer", "index", "kind", "gradient", "sample",
                 "batch_size", "rank", "bound", "max_rank"]
