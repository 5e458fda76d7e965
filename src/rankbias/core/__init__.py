"""The bottom layer: the run spec and the family registry, the dataset tables, atomic I/O
and the job timing log. Imports nothing else of rankbias and never imports torch."""
