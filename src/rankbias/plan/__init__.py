"""Config to runs to packs: the planner, the cost model and time limits, the container
image, the run plan behind the progress lines. Imports only `core`; never imports torch
(a Snakemake parse imports this layer)."""
