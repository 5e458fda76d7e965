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

.PHONY: install reproduce test test-fast test-image lint bench gpu-check lock publish crate clean image docker apptainer

install: $(STAMP)

# Every package from the locks, each file checked against the lock's sha256 (a file the
# registry serves with other bytes than when the lock was made is refused); then the
# package itself, from this checkout, with nothing else resolved.
$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	"$(PYTHON)" -m venv "$(VENV)"
	"$(BIN)/pip" install --disable-pip-version-check -q --require-hashes -r requirements.lock -r requirements-test.lock
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
# pyproject.toml) on the package, the package's layers (scripts/check_layers.py: no upward
# import, no cycle, core and plan torch-free), snakefmt and Snakemake's own linter on the workflow.
lint: $(STAMP)
	"$(BIN)/ruff" check src containers scripts
	"$(BIN)/python" scripts/check_layers.py src/rankbias
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
# requirements-test.lock for what the test extra adds on top. The pins are what pip
# installs into a fresh venv; pip-tools' pip-compile then adds the sha256 of every file
# the registry serves for each pinned release, and scripts/hash_locks.py writes both
# locks (refusing any pin that changed on the way).
LOCK_TMP := /tmp/rankbias-lock
lock:
	rm -rf $(LOCK_TMP) && $(PYTHON) -m venv $(LOCK_TMP)/venv && $(PYTHON) -m venv $(LOCK_TMP)/tools
	$(LOCK_TMP)/venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 '.[workflow]'
	$(LOCK_TMP)/venv/bin/pip freeze --all --exclude rankbias --exclude pip > $(LOCK_TMP)/runtime.txt
	$(LOCK_TMP)/venv/bin/pip install -q -c $(LOCK_TMP)/runtime.txt '.[test]'
	$(LOCK_TMP)/venv/bin/pip freeze --all --exclude rankbias --exclude pip \
	  | grep -v -x -F -f $(LOCK_TMP)/runtime.txt > $(LOCK_TMP)/test.txt
	$(LOCK_TMP)/tools/bin/pip install -q pip-tools
	cat $(LOCK_TMP)/runtime.txt $(LOCK_TMP)/test.txt > $(LOCK_TMP)/all.in
	$(LOCK_TMP)/tools/bin/pip-compile -q --generate-hashes --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links --no-annotate --no-header --strip-extras -o $(LOCK_TMP)/all.txt $(LOCK_TMP)/all.in
	$(PYTHON) scripts/hash_locks.py $(LOCK_TMP)/all.txt $(LOCK_TMP)/runtime.txt $(LOCK_TMP)/test.txt

# The committed results' DVC cache as static files (dist/results-cache: objects, manifest,
# SHA256SUMS) for a read-only HTTP(S) remote; PUBLISH_ARGS="--archive dist/results-cache.tar.gz"
# also writes the archive to deposit for a DOI. See docs/provenance.md, "Sharing the results".
PUBLISH_ARGS ?=
publish: $(STAMP)
	"$(BIN)/rankbias" publish $(PUBLISH_ARGS)

# The results' provenance as a Workflow Run RO-Crate: ro-crate-metadata.json.
crate: $(STAMP)
	"$(BIN)/rankbias" export-crate

# Container images (need Docker / Apptainer; see docs/running.md, "Containers and SLURM").
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
