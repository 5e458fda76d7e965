"""Training: data, models, batched layers, the chain rule, the engine and its graphs, the
epoch loop with checkpoints, Theorem 1's measurement, numerics, GPUs, the bench and the
plain reference loop. Imports `core`, `plan` and `store`."""
