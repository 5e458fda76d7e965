"""What training stores and everything after reads: run files and their verification,
metrics on stored spectra, the theory tables' format, provenance records. Imports `core`."""
