"""`rankbias export-crate` on the tiny pipeline's real results: a Workflow Run RO-Crate
that the `rocrate` library (ro-crate-py, the RO-Crate community's Python library) reads
back, with every figure and the claims as a CreateAction holding its runs, code version,
parameters and checksums, each checked against the provenance records and the files."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import copy_repo
from test_dvc import sh

from rankbias.verify import crate as C
from rankbias.core.io import file_digest

pytestmark = pytest.mark.slow
rocrate = pytest.importorskip("rocrate.rocrate", reason="the test extra's rocrate (requirements-test.lock)")


@pytest.fixture(scope="module")
def exported(tiny_pipeline, tmp_path_factory):
    """A copy of the repository holding the tiny pipeline's results, and its crate."""
    outside, _ = tiny_pipeline
    repo = copy_repo(tmp_path_factory.mktemp("crate") / "repo")
    for d in ("results", "data"):
        shutil.copytree(outside / d, repo / d, symlinks=True)
    p = sh(repo, "rankbias", "export-crate")
    assert "export-crate:" in p.stdout, p.stdout
    return repo


def test_crate_is_read_by_rocrate_as_a_workflow_run_crate(exported):
    crate = rocrate.ROCrate(exported)
    meta = json.loads((exported / C.METADATA).read_text())
    assert meta["@context"][0] == "https://w3id.org/ro/crate/1.1/context"
    descriptor = next(e for e in meta["@graph"] if e["@id"] == C.METADATA)
    assert descriptor["conformsTo"] == {"@id": "https://w3id.org/ro/crate/1.1"}
    root = crate.root_dataset
    assert {c.id if hasattr(c, "id") else c["@id"] for c in root["conformsTo"]} == set(C.PROFILES)
    main = crate.mainEntity
    assert main.id == "Snakefile" and {"File", "SoftwareSourceCode", "ComputationalWorkflow"} <= set(main.type)
    assert main["programmingLanguage"]["name"] == "Snakemake"
    workflow_run = crate.get("#workflow-run")
    assert workflow_run.type == "CreateAction" and workflow_run["instrument"].id == "Snakefile"
    mentioned = {a.id for a in root["mentions"]}
    assert "#workflow-run" in mentioned and "#claims" in mentioned
    # Every data entity the crate names lies in the repository, with the sha256 of its bytes.
    files = [e for e in crate.get_entities() if e.type == "File"]
    assert files
    for f in files:
        path = exported / f.id
        assert path.is_file(), f.id
        if f.get("sha256"):
            assert f["sha256"] == file_digest(path, "sha256"), f.id


def test_each_figure_and_the_claims_is_an_action_with_its_record(exported):
    crate = rocrate.ROCrate(exported)
    sidecars = sorted((exported / "results/figures").glob("*.provenance.json"))
    assert len(sidecars) >= 8
    for sidecar in [*sidecars, exported / "results/claims.provenance.json"]:
        record = json.loads(sidecar.read_text())
        name = record["figure"]
        action = crate.get(f"#{name}")
        assert action is not None and action.type == "CreateAction", name
        assert action in crate.root_dataset["mentions"] and action["endTime"] == record["environment"]["created"]
        results = {r.id: r for r in action["result"]}
        assert sidecar.relative_to(exported).as_posix() in results
        for rel, f in results.items():
            assert f["sha256"] == file_digest(exported / rel, "sha256"), rel
        objects = {o.id: o for o in action["object"]}
        for run in record["runs"]:
            ds = objects[run["path"] + "/"]
            assert ds.type == "Dataset" and ds["identifier"] == run["run_id"]
            parts = {p.id: p for p in ds["hasPart"]}
            for fname, sha in run["files"].items():
                assert parts[f"{run['path']}/{fname}"]["sha256"] == sha
            assert parts[f"{run['path']}/run.json"]["sha256"] == run["run_json_sha256"]
            # The run's own training, with its spec as parameters.
            train = crate.get(f"#train-{run['run_id']}")
            assert train["result"][0].id == ds.id
            params = {p["name"]: p["value"] for p in train["object"] if p.type == "PropertyValue"}
            assert params["spec.lr"] == json.dumps(run["spec"]["lr"])
        params = {o["name"]: o["value"] for o in objects.values() if o.type == "PropertyValue"}
        assert params["rank.tol"] == json.dumps(record["rank"]["tol"])
        for ds_name, info in record["datasets"].items():
            data = objects[f"data/{ds_name}/"]
            assert {p["value"] for p in data["additionalProperty"]} == set(info["checksums"].values())
        software = action["instrument"]
        env = record["environment"]
        assert software["sha256"] == env["package"]["sources_sha256"]
        commit = env["code"]["commit"] or env["package"]["git"]["commit"]
        assert software["identifier"] == f"git:{commit}"
    claims = crate.get("#claims")
    record = json.loads((exported / "results/claims.provenance.json").read_text())
    for fname, sha in record["outputs"].items():
        assert crate.get(f"results/{fname}")["sha256"] == sha
    assert {r.id for r in claims["result"]} <= {r.id for r in crate.get("#workflow-run")["result"]}


def test_every_term_is_defined_by_the_crate_context(exported):
    """Every property and type the crate uses is a term of the RO-Crate 1.1 context (the
    copy ro-crate-py ships), or of the Workflow Run terms the crate's second context
    names (the container image's type and property)."""
    from importlib import resources

    context = json.loads(resources.files("rocrate").joinpath("data/ro-crate.jsonld").read_text())["@context"]
    workflow_run_terms = {"ContainerImage", "containerImage"}
    meta = json.loads((exported / C.METADATA).read_text())
    used = set()
    for e in meta["@graph"]:
        used |= {k for k in e if not k.startswith("@")}
        used |= set(e["@type"] if isinstance(e["@type"], list) else [e["@type"]])
    assert not used - set(context) - workflow_run_terms, sorted(used - set(context) - workflow_run_terms)


def test_the_container_image_is_named_with_its_digest(exported, tmp_path):
    """A figure drawn in the image: its action names the image and its digest."""
    record = json.loads((exported / "results/figures/fig1.provenance.json").read_text())
    digest = "sha256:" + "ab" * 32
    record["environment"]["container"] = {"image": "rankbias:0e22734", "image_digest": digest, "runtime": "docker"}
    (tmp_path / "results/figures").mkdir(parents=True)
    (tmp_path / "results/figures/fig1.provenance.json").write_text(json.dumps(record))
    graph = {e["@id"]: e for e in C.build(tmp_path)["@graph"]}
    image = graph[graph["#fig1"]["containerImage"]["@id"]]
    assert image["@type"] == "ContainerImage" and image["name"] == "rankbias:0e22734"
    assert image["sha256"] == "ab" * 32
    assert image["additionalType"] == {"@id": "https://w3id.org/ro/terms/workflow-run#DockerImage"}
