"""`rankbias export-crate`: the results' provenance as a Workflow Run RO-Crate.

It writes ``ro-crate-metadata.json`` (RO-Crate 1.1, conforming to the Workflow Run Crate,
Process Run Crate and Workflow RO-Crate profiles) at the repository root, so the crate
is the repository: its main entity is the ``Snakefile``, and the data entities are the
files under ``results/`` and ``data/``, named by their paths. It is built only from the
provenance records the pipeline wrote (each figure's ``<stem>.provenance.json`` and
``results/claims.provenance.json``) and the files themselves:

- one ``CreateAction`` per figure and one for the claims: the runs it read (``object``,
  each run a ``Dataset`` of its files with their sha256), its parameters (rank settings,
  the figure's config section; ``PropertyValue``), the files it wrote (``result``, with
  sha256 and size), the code that ran (``instrument``: a ``SoftwareApplication`` with the
  version, git commit and the sha256 of the package's sources), the container image
  (``containerImage``) and its end time;
- one ``CreateAction`` per run, its training: the run's spec as parameters, the dataset
  (with its published checksums) as input, the run's files as result, and the code and
  image that trained it;
- one ``CreateAction`` for the workflow (Snakemake running the ``Snakefile`` on the
  config ``params.yaml`` names), whose results are every figure's and the claims' files.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
from pathlib import Path

import yaml

from rankbias.core.io import file_digest
from rankbias.store.provenance import rel_path
from rankbias import __version__
from rankbias.core.io import utc_now
from rankbias.core.io import atomic_write_bytes

RO_CRATE = "https://w3id.org/ro/crate/1.1"
CONTEXT = [f"{RO_CRATE}/context", "https://w3id.org/ro/terms/workflow-run/context"]
PROFILES = ("https://w3id.org/ro/wfrun/process/0.5", "https://w3id.org/ro/wfrun/workflow/0.5",
            "https://w3id.org/workflowhub/workflow-ro-crate/1.0")
METADATA = "ro-crate-metadata.json"
COMPLETED = {"@id": "http://schema.org/CompletedActionStatus"}


def _ref(entity_id: str) -> dict:
    return {"@id": entity_id}


class _Crate:
    """The crate's entities by @id, in the order first added."""

    def __init__(self, root: Path):
        self.root = root
        self.entities: dict[str, dict] = {}

    def add(self, entity: dict) -> dict:
        """`entity`, merged into one already there with its @id."""
        have = self.entities.setdefault(entity["@id"], {})
        for k, v in entity.items():
            have.setdefault(k, v)
        return have

    def file(self, rel: str, sha256: str | None = None, role: str | None = None) -> dict:
        """A File data entity for the repository path `rel`: its sha256 (computed when not
        given and the file exists), size and media type."""
        path = self.root / rel
        e: dict = {"@id": rel, "@type": "File", "name": Path(rel).name}
        if path.is_file():
            e["contentSize"] = str(path.stat().st_size)
            sha256 = sha256 or file_digest(path, "sha256")
        if sha256:
            e["sha256"] = sha256
        kind = mimetypes.guess_type(rel)[0] or {".parquet": "application/vnd.apache.parquet",
                                                ".npz": "application/octet-stream",
                                                ".md": "text/markdown"}.get(Path(rel).suffix)
        if kind:
            e["encodingFormat"] = kind
        if role:
            e["description"] = role
        return self.add(e)

    def software(self, env: dict) -> dict:
        """The rankbias that ran, from a record's ``environment`` (or a run's provenance)."""
        package = env.get("package") or {}
        git = package.get("git") if isinstance(package.get("git"), dict) else {}
        code = env.get("code") or {}
        commit = code.get("commit") or (git or {}).get("commit")
        sources = package.get("sources_sha256")
        version = (env.get("packages") or {}).get("rankbias")
        key = commit or sources or version or "unknown"
        e: dict = {"@id": f"#rankbias-{key[:16]}", "@type": "SoftwareApplication", "name": "rankbias",
             "url": "https://arxiv.org/abs/2206.05794"}
        if version:
            e["version"] = version
        if commit:
            e["identifier"] = f"git:{commit}"
            e["softwareVersion"] = code.get("describe") or (git or {}).get("describe") or commit
        if sources:
            e["sha256"] = sources
            e["description"] = (f"rankbias sources: sha256 {sources} over {package.get('files')} .py files"
                                + (f"; git commit {commit}" + (" (with uncommitted changes)"
                                                               if code.get("dirty") or (git or {}).get("dirty") else "")
                                   if commit else ""))
        deps = {k: v for k, v in (env.get("packages") or {}).items() if v and k != "rankbias"}
        if deps:
            e["softwareRequirements"] = [_ref(self.add({
                "@id": f"#software-{name}-{v}", "@type": "SoftwareApplication", "name": name,
                "version": v})["@id"]) for name, v in sorted(deps.items())]
        return self.add(e)

    def image(self, env: dict) -> dict | None:
        c = env.get("container") or {}
        image, digest = c.get("image"), c.get("image_digest")
        if not image and not digest:
            return None
        e: dict = {"@id": f"#image-{str(digest or image).replace('sha256:', '')[:24]}", "@type": "ContainerImage",
                   "additionalType": _ref("https://w3id.org/ro/terms/workflow-run#"
                                          + ("SIFImage" if c.get("runtime") == "apptainer" else "DockerImage"))}
        if image:
            e["name"] = image
        if digest:
            e["sha256"] = str(digest).removeprefix("sha256:")
        return self.add(e)

    def parameters(self, prefix: str, values: dict) -> list[dict]:
        """Flat ``PropertyValue``s, one per leaf of `values` (dotted names; lists and
        scalars as JSON text)."""
        out = []

        def walk(name: str, v) -> None:
            if isinstance(v, dict) and v:
                for k in sorted(v):
                    walk(f"{name}.{k}" if name else str(k), v[k])
                return
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            out.append(_ref(self.add({"@id": f"#{prefix}-param-{name}", "@type": "PropertyValue",
                                      "name": name, "value": text})["@id"]))

        walk("", values)
        return out


def _run_dataset(crate: _Crate, run: dict) -> dict:
    path = str(run.get("path") or f"results/runs/{run.get('run_id')}").rstrip("/")
    parts = [crate.file(f"{path}/{name}", sha) for name, sha in sorted((run.get("files") or {}).items())]
    parts.append(crate.file(f"{path}/run.json", run.get("run_json_sha256"), "the run's record"))
    return crate.add({"@id": f"{path}/", "@type": "Dataset", "name": f"run {run.get('run_id')}",
                      "description": f"{run.get('model')}, {run.get('status')}, "
                                     f"{run.get('epochs_completed')} epoch(s); pack {run.get('pack_id')}",
                      "identifier": str(run.get("run_id")), "hasPart": [_ref(p["@id"]) for p in parts]})


def _data_dataset(crate: _Crate, name: str, info: dict) -> dict:
    sums = info.get("checksums") or {}
    return crate.add({
        "@id": f"data/{name}/", "@type": "Dataset", "name": name,
        "description": f"dataset {name} (source: {info.get('source')}), verified against its published checksums",
        "additionalProperty": [_ref(crate.add({"@id": f"#data-{name}-md5-{f}", "@type": "PropertyValue",
                                               "propertyID": "md5", "name": f"md5 of {f}", "value": md5})["@id"])
                               for f, md5 in sorted(sums.items())]})


def _finished(crate: _Crate, action: dict, env: dict) -> dict:
    """An action with its end time and container image from the record's environment, added."""
    if env.get("created"):
        action["endTime"] = env["created"]
    image = crate.image(env)
    if image:
        action["containerImage"] = _ref(image["@id"])
    return crate.add(action)


def _training(crate: _Crate, run: dict, dataset: dict | None) -> dict:
    """The run's training as an action; returns the run's dataset entity (its result)."""
    prov = run.get("provenance") or {}
    run_ds = _run_dataset(crate, run)
    action = {"@id": f"#train-{run.get('run_id')}", "@type": "CreateAction",
              "name": f"train run {run.get('run_id')} (rankbias train, pack {run.get('pack_id')})",
              "instrument": _ref(crate.software(prov)["@id"]),
              "object": ([_ref(dataset["@id"])] if dataset else [])
              + crate.parameters(f"run-{run.get('run_id')}", {"spec": run.get("spec") or {},
                                                             "seeds": run.get("seeds")}),
              "result": [_ref(run_ds["@id"])], "actionStatus": COMPLETED}
    _finished(crate, action, prov)
    return run_ds


def _output_action(crate: _Crate, name: str, record: dict, outputs: list[str]) -> dict:
    env = record.get("environment") or {}
    runs = []
    datasets = {n: _data_dataset(crate, n, info) for n, info in sorted((record.get("datasets") or {}).items())}
    for run in record.get("runs") or []:
        ds = run.get("dataset") if isinstance(run.get("dataset"), dict) else {}
        runs.append(_ref(_training(crate, run, datasets.get((ds or {}).get("name")))["@id"]))
    params = crate.parameters(name, {"rank": record.get("rank") or {}, "config": record.get("config") or {}})
    sums = record.get("outputs") or {}
    result = [_ref(crate.file(o, sums.get(Path(o).name))["@id"]) for o in outputs]
    what = "judge the claims (rankbias claims)" if name == "claims" else f"draw {name} (rankbias figure {name})"
    action = {"@id": f"#{name}", "@type": "CreateAction", "name": what,
              "instrument": _ref(crate.software(env)["@id"]),
              "object": runs + [_ref(d["@id"]) for d in datasets.values()] + params,
              "result": result, "actionStatus": COMPLETED}
    return _finished(crate, action, env)


def _records(root: Path, results: Path) -> list[tuple[str, dict, list[str]]]:
    """(name, record, output paths) of every figure with a sidecar, and of the claims."""

    out = []
    for sidecar in sorted((results / "figures").glob("*.provenance.json")):
        stem = sidecar.name.removesuffix(".provenance.json")
        files = [sidecar.with_name(stem + s) for s in (".png", ".pdf", ".provenance.html")]
        outputs = [rel_path(f, root) for f in files if f.exists()] + [rel_path(sidecar, root)]
        out.append((stem, json.loads(sidecar.read_text()), outputs))
    claims = results / "claims.provenance.json"
    if claims.exists():
        files = [results / f"claims{s}" for s in (".md", ".json", ".html", ".metrics.json")]
        outputs = [rel_path(f, root) for f in files if f.exists()] + [rel_path(claims, root)]
        out.append(("claims", json.loads(claims.read_text()), outputs))
    if not out:
        raise FileNotFoundError(f"{results}: no figure provenance (figures/*.provenance.json) and no "
                                "claims.provenance.json; run the pipeline first")
    return out


def build(root: str | Path = ".", results: str | Path = "results") -> dict:
    """The crate's JSON-LD for the results under `results` in the repository `root`."""

    root = Path(root).resolve()
    results = Path(results) if Path(results).is_absolute() else root / results
    crate = _Crate(root)
    records = _records(root, results)
    actions = [_output_action(crate, name, record, outputs) for name, record, outputs in records]
    try:
        configfile = str((yaml.safe_load((root / "params.yaml").read_text()) or {}).get("configfile"))
    except (OSError, yaml.YAMLError, AttributeError):
        configfile = None
    snakemake_version = next((v for _, r, _ in records
                              if (v := ((r.get("environment") or {}).get("packages") or {}).get("snakemake"))), None)
    lang = crate.add({"@id": "#snakemake", "@type": "ComputerLanguage", "name": "Snakemake",
                      "identifier": _ref("https://doi.org/10.12688/f1000research.29032.2"),
                      "url": _ref("https://snakemake.readthedocs.io")}
                     | ({"version": snakemake_version} if snakemake_version else {}))
    workflow = crate.add({"@id": "Snakefile", "@type": ["File", "SoftwareSourceCode", "ComputationalWorkflow"],
                          "name": "rankbias workflow", "programmingLanguage": _ref(lang["@id"]),
                          "description": "Trains the paper's experiment grids, draws its figures and judges its claims"})
    times = sorted(t for e in crate.entities.values() if e.get("@type") == "CreateAction"
                   for t in [e.get("endTime")] if t)
    outputs = [r for a in actions for r in a["result"]]
    run_action: dict = {"@id": "#workflow-run", "@type": "CreateAction",
                        "name": "snakemake: the rankbias workflow's figures and claims",
                        "instrument": _ref(workflow["@id"]), "result": outputs, "actionStatus": COMPLETED}
    if configfile and (root / configfile).is_file():
        run_action["object"] = [_ref(crate.file(configfile, role="the config the results were built from")["@id"])]
    if times:
        run_action["startTime"], run_action["endTime"] = times[0], times[-1]
    crate.add(run_action)
    mentions = [_ref("#workflow-run")] + [_ref(a["@id"]) for a in actions] + [
        _ref(i) for i, e in crate.entities.items() if i.startswith("#train-")]
    data_ids = [i for i, e in crate.entities.items() if e.get("@type") in ("File", "Dataset") and i != "Snakefile"]
    root_entity = {
        "@id": "./", "@type": "Dataset", "name": "rankbias results",
        "description": "Results of the reproduction of 'SGD and weight decay secretly minimise the rank of "
                       "your neural network' (Galanti, Siegel, Gupte, Poggio): the runs, figures and claims "
                       "with the provenance of each",
        "datePublished": utc_now(), "license": _ref("https://spdx.org/licenses/MIT"),
        "conformsTo": [_ref(p) for p in PROFILES],
        "mainEntity": _ref("Snakefile"),
        "hasPart": [_ref("Snakefile")] + [_ref(i) for i in data_ids],
        "mentions": mentions,
        "citation": _ref("https://arxiv.org/abs/2206.05794"),
        "version": __version__,
    }
    profiles = [{"@id": p, "@type": "CreativeWork", "name": name, "version": p.rsplit("/", 1)[1]}
                for p, name in zip(PROFILES, ("Process Run Crate", "Workflow Run Crate", "Workflow RO-Crate"))]
    extra = [{"@id": "https://spdx.org/licenses/MIT", "@type": "CreativeWork", "name": "MIT License"},
             {"@id": "https://arxiv.org/abs/2206.05794", "@type": "ScholarlyArticle",
              "name": "SGD and weight decay secretly minimise the rank of your neural network"}]
    graph = [{"@id": METADATA, "@type": "CreativeWork", "conformsTo": _ref(RO_CRATE), "about": _ref("./")},
             root_entity, *crate.entities.values(), *profiles, *extra]
    return {"@context": CONTEXT, "@graph": graph}


def export(root: str | Path = ".", results: str | Path = "results", out: str | Path | None = None) -> Path:

    root = Path(root)
    target = Path(out) if out is not None else root / METADATA
    text = json.dumps(build(root, results), indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(target, text.encode())
    return target


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-crate", help="write the results' provenance as a Workflow Run RO-Crate (ro-crate-metadata.json)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=".", help="repository root: the crate's root (default: .)")
    p.add_argument("--results", default="results", help="results directory (default: %(default)s)")
    p.add_argument("--out", default=None, help=f"file to write (default: ROOT/{METADATA})")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    target = export(args.root, args.results, args.out)
    doc = json.loads(target.read_text())
    actions = [e for e in doc["@graph"] if e.get("@type") == "CreateAction"]
    print(f"export-crate: {target}: {len(actions)} action(s), {len(doc['@graph'])} entities")
    return 0
