"""From stored runs to the figures and the claims table. Imports `core`, `plan` and
`store`; never `train` (drawing a figure never loads a network)."""
