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

.PHONY: install reproduce test test-fast test-image lint bench gpu-check lock clean image docker apptainer

install: $(STAMP)

$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	"$(PYTHON)" -m venv "$(VENV)"
	"$(BIN)/pip" install --disable-pip-version-check -q -r requirements.lock -r requirements-test.lock
	"$(BIN)/pip" install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch "$(STAMP)"

# The quick profile (config/config.yaml): real MNIST, every figure and the claims table.
# (`snakemake` finds the workstation profile, workflow/profiles/default, by itself.)
reproduce: $(STAMP)
	start=$$(date +%s) && $(WITH_VENV) "$(BIN)/snakemake" --cores $(CORES) $(SNAKEMAKE_ARGS) && \
	  $(WITH_VENV) "$(BIN)/rankbias" timing --since $$start --cores $(CORES)
	@echo
	@echo "Figures: $$PWD/results/figures/fig1.png ... (fig1-fig8, figT1, figT2, figR, figS; .png and .pdf)"
	@echo "Claims:  $$PWD/results/claims.md"

# Every test, the slow integration tests (real snakemake, dvc, slurm) included.
test: $(STAMP)
	$(WITH_VENV) "$(BIN)/python" -m pytest -q $(TESTS)

# Unit and property tests only.
test-fast: $(STAMP)
	$(WITH_VENV) "$(BIN)/python" -m pytest -q -m "not slow" $(TESTS)

# Static checks (CI runs them before the tests): ruff and mypy (both configured in
# pyproject.toml) on the package, snakefmt and Snakemake's own linter on the workflow.
lint: $(STAMP)
	"$(BIN)/ruff" check src containers
	"$(BIN)/mypy"
	"$(BIN)/snakefmt" --check Snakefile workflow
	$(WITH_VENV) "$(BIN)/snakemake" --lint --cores 1

# The container image built with podman on a local Debian base and the tiny pipeline
# run in it (tests/test_containers.py; as root, with podman, runc and debootstrap).
test-image: $(STAMP)
	RANKBIAS_TEST_IMAGE=1 $(WITH_VENV) "$(BIN)/python" -m pytest -q -rs tests/test_containers.py -k test_image_runs

# The production image (digest-pinned CUDA PyTorch base), with podman or docker.
image:
	$${CONTAINER_ENGINE:-podman} build -f containers/Dockerfile -t rankbias:$$(git rev-parse --short HEAD) \
	  --build-arg REVISION=$$(git rev-parse HEAD) .

bench: $(STAMP)
	"$(BIN)/rankbias" bench --json

# On a machine with CUDA and a Python that has torch, numpy, pandas and pytest (no
# install): the CUDA tests (bit-reproducible conv packs among them), the bench with its
# roofline, every pack shape of the paper profile timed (a table, the profile's
# GPU-hours, and results/gpu-timings.json, which then sets the workflow's job time
# limits). Options: `make gpu-check GPU_CHECK_ARGS="--config config/config.yaml"`.
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=src $(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# Regenerate the locks from the direct dependencies (needs the package registry):
# requirements.lock for the package and its workflow extra (what the image installs),
# requirements-test.lock for what the test extra adds on top.
lock:
	rm -rf /tmp/rankbias-lock && $(PYTHON) -m venv /tmp/rankbias-lock
	/tmp/rankbias-lock/bin/pip install -q torch==2.14.1 torchvision==0.29.1 '.[workflow]'
	( echo "# Pinned lock of every Python package rankbias runs with: the package and its \`workflow\`"; \
	  echo "# extra (make install, CI and the container image install this file). Regenerate: make lock"; \
	  /tmp/rankbias-lock/bin/pip freeze --all --exclude rankbias --exclude pip ) > requirements.lock
	/tmp/rankbias-lock/bin/pip install -q -c requirements.lock '.[test]'
	( echo "# Pinned lock of the \`test\` extra (test and lint tools), on top of requirements.lock:"; \
	  echo "# make install and CI install it, the container image does not. Regenerate: make lock"; \
	  /tmp/rankbias-lock/bin/pip freeze --all --exclude rankbias --exclude pip \
	    | grep -v -x -F -f requirements.lock ) > requirements-test.lock

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
