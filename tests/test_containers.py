"""The container recipes and the SLURM profile, checked against the real tools:
hadolint for the Dockerfile, the installed Snakemake and SLURM executor plugin for the
profile's keys."""
from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, slurm_profile_without_apptainer

from rankbias.cluster import container_image

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "containers" / "Dockerfile"
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


def test_every_base_image_is_pinned_by_digest():
    froms = [args.split()[0] for ins, args in _instructions(DOCKERFILE.read_text()) if ins == "FROM"]
    assert froms, "containers/Dockerfile has no FROM"
    for image in froms:
        assert DIGEST.search(image), f"base image {image} is not pinned by @sha256:<digest>"


def _installed_lock_files(text: str) -> list[str]:
    """Repository files the image installs with `pip install -r`, via their COPY."""
    copied = {}  # destination in the image -> source in the repository
    found = []
    workdir = "/"
    for word, args in _instructions(text):
        if word == "WORKDIR":
            workdir = args if args.startswith("/") else str(Path(workdir) / args)
        elif word == "COPY":
            *srcs, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            for src in srcs:
                target = dest + Path(src).name if dest.endswith("/") else dest
                copied[str(Path(workdir) / target)] = src
        elif word == "RUN":
            for m in re.finditer(r"pip install[^&;|]*?(?:-r|--requirement)\s+(\S+)", args):
                path = str(Path(workdir) / m.group(1))
                assert path in copied, f"the image installs {m.group(1)}, which no COPY puts there"
                found.append(copied[path])
    return found


def test_image_installs_the_lock_that_make_and_ci_install():
    locks = _installed_lock_files(DOCKERFILE.read_text())
    makefile = (ROOT / "Makefile").read_text()
    make_locks = re.findall(r"pip install[^\n]*?-r\s+(\S+)", makefile)
    assert locks and make_locks, "no `pip install -r <lock>` found"
    assert set(locks) == set(make_locks) == {"requirements.lock"}
    # CI runs `make test`, whose stamp target is the install from that same lock.
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^test: \$\(STAMP\)", makefile, re.M)
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.14\.1$", lock, re.M)
    assert re.search(r"^snakemake==", lock, re.M), "Snakemake must come from the lock too"


def test_parser_finds_a_lock_installed_from_an_unrelated_file():
    text = ("FROM x@sha256:" + "0" * 64 + "\nWORKDIR /opt\nCOPY other.txt ./requirements.lock\n"
            "RUN pip install --no-cache-dir -r requirements.lock\n")
    assert _installed_lock_files(text) == ["other.txt"]


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
