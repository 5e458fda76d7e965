"""`rankbias audit FIGURE`: show what made a figure (or the claims table) and check the
tree still matches.

The figure's provenance (embedded in the PNG/PDF, and in the sidecar
``<stem>.provenance.json``) names every run it drew from with the sha256 of each of
the run's files, the code commit, the datasets' checksums and the environment. The
audit prints that record as a tree and then checks, against the tree as it is now:

  * the figure's four files (PNG, PDF, sidecar, readable page) are all there, the
    sidecar equals what is embedded in the PNG and the PDF, and the page
    ``<stem>.provenance.html`` is what that record renders (for the claims table
    ``results/claims.md``: the sidecar records the sha256 of claims.md and
    claims.json, and both still have it);
  * every run directory exists, passes ``Run.verify()`` (files match run.json, run_id
    matches its spec) and holds exactly the files, hashes and spec the figure recorded;
  * the datasets' recorded checksums equal the published ones and the local manifest;
  * ``dvc.lock`` (when present) records the figure's files with their current md5, and
    the run files with the md5 in the recorded ``results/runs`` manifest;
  * the sources of the package that made it (their recorded sha256) equal the
    checkout's ``src/rankbias``: a copy first on PYTHONPATH or an installed package is
    not the checkout;
  * the code that made the figure equals the working tree (``git diff`` against the
    recorded commit, ignoring DVC bookkeeping (dvc.lock, params.yaml) and Markdown; a
    file that git neither tracks nor ignores counts as a change).

Exit status: 0 everything matches, 1 a mismatch (one line per differing file or fact),
2 bad usage or a missing figure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rankbias.verify import dvcstate
from rankbias.store import provenance as P
from rankbias.store.results import CheckedRun, check_run
from rankbias.core.io import sha256_file
from rankbias.core.datasets import expected_md5
from rankbias.store.provenance_page import page_bytes, page_path

# Paths whose changes cannot change a figure: DVC bookkeeping, training records and prose.
# params.yaml is DVC bookkeeping too: it names the config file DVC's stages pass to
# snakemake (`configfile`), which the README has set before `dvc commit`; what a figure
# was drawn from is its own record (runs, specs, rank settings), checked above.
CODE_EXCLUDES = (":(exclude)dvc.lock", ":(exclude)params.yaml", ":(exclude,glob)**/*.dvc",
                 ":(exclude).dvc", ":(exclude,glob)**/*.md", ":(exclude).dvcignore",
                 ":(exclude).rankbias")


def other_format(figure: Path) -> Path:
    """The figure's other image: the PDF of a PNG, the PNG of a PDF."""
    return figure.with_suffix(".pdf" if figure.suffix.lower() == ".png" else ".png")


def is_table(output: Path) -> bool:
    """The claims table (Markdown, with its JSON beside it) rather than a figure."""
    return output.suffix.lower() == ".md"


def own_files(output: Path) -> list[Path]:
    """The files one provenance record covers: a figure's PNG, PDF, sidecar and the page
    rendered from it, or the claims' Markdown, JSON and sidecar."""
    if is_table(output):
        return [output, output.with_suffix(".json"), P.sidecar_path(output)]
    return [output, other_format(output), P.sidecar_path(output), page_path(output)]


class Audit:
    def __init__(self, figure: Path, root: Path, runs: dict[Path, CheckedRun] | None = None):
        """`runs`: run directories already checked (shared by the audits of several figures,
        as `rankbias restore` does), so that each is verified once."""
        self.figure, self.root = figure, root
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.checked = 0
        self.verified_runs: dict[Path, CheckedRun] = runs if runs is not None else {}

    def rel(self, p: Path) -> str:
        return P.rel_path(p, self.root)

    def fail(self, what: str, detail: str) -> None:
        self.problems.append(f"{what}: {detail}")

    def ok(self) -> None:
        self.checked += 1

    # -- the checks ----------------------------------------------------------------
    def record(self) -> dict | None:
        """The output's provenance record, checked against the files it describes."""
        return self.table() if is_table(self.figure) else self.images()

    def table(self) -> dict | None:
        """The claims' sidecar, and the sha256 it records of the Markdown and the JSON."""
        side = P.sidecar_path(self.figure)
        try:
            record = P.read_sidecar(self.figure)
        except FileNotFoundError:
            self.fail(self.rel(side), "provenance sidecar missing")
            return None
        except P.ProvenanceError as e:
            self.fail(self.rel(side), e.detail)
            return None
        outputs = record.get("outputs")
        if not isinstance(outputs, dict):
            self.fail(self.rel(side), "records no sha256 of the outputs it describes")
            return record
        for f in own_files(self.figure)[:2]:
            want = outputs.get(f.name)
            if want is None:
                self.fail(self.rel(f), f"not recorded in {self.rel(side)}")
            elif not f.is_file():
                self.fail(self.rel(f), f"missing (recorded in {self.rel(side)})")
            elif sha256_file(f) != want:
                self.fail(self.rel(f), f"sha256 differs from the one {self.rel(side)} records")
            else:
                self.ok()
        return record

    def images(self) -> dict | None:
        try:
            record = P.read_embedded(self.figure)
        except P.ProvenanceError as e:
            self.fail(self.rel(self.figure), f"embedded provenance unreadable ({e})")
            record = None
        side = P.sidecar_path(self.figure)
        try:
            sidecar = P.read_sidecar(self.figure)
        except FileNotFoundError:
            self.fail(self.rel(side), "provenance sidecar missing")
        except P.ProvenanceError as e:
            self.fail(self.rel(side), e.detail)
        else:
            if record is not None:
                if sidecar != record:
                    self.fail(self.rel(side), f"differs from the provenance embedded in "
                                              f"{self.rel(self.figure)}")
                else:
                    self.ok()
            record = record if record is not None else sidecar
        other = other_format(self.figure)
        if not other.exists():
            # The PNG, PDF and sidecar are written together: one missing is an interrupted or
            # partial copy, whatever the others say.
            self.fail(self.rel(other), f"missing: a figure is its PNG, PDF and provenance "
                                       f"sidecar together, and {self.rel(self.figure)} is here")
        elif record is not None:
            try:
                if P.read_embedded(other) != record:
                    self.fail(self.rel(other), f"its embedded provenance differs from "
                                               f"{self.rel(self.figure)}'s")
                else:
                    self.ok()
            except P.ProvenanceError as e:
                self.fail(self.rel(other), f"embedded provenance unreadable ({e})")
        if record is not None:
            self.page(record)
        return record

    def page(self, record: dict) -> None:
        """The readable page beside the figure: byte for byte what its record renders, so
        it cannot say something the record does not."""
        page = page_path(self.figure)
        if not page.is_file():
            self.fail(self.rel(page), "missing: `rankbias figure` writes it with the figure's PNG, "
                                      "PDF and provenance sidecar")
        elif page.read_bytes() != page_bytes(record):
            self.fail(self.rel(page), f"differs from the page the provenance of "
                                      f"{self.rel(self.figure)} renders (stale or edited)")
        else:
            self.ok()

    def run_dir(self, rec: dict) -> Path:
        """The run directory a record names, which must lie inside the repository's
        results/ (DvcStateError naming the record otherwise)."""
        p = Path(rec.get("path") or Path("results/runs") / str(rec.get("run_id")))
        dvcstate.repo_path(self.root, p, f"{self.rel(self.figure)}: run {rec.get('run_id')}")
        return self.root / p

    def runs(self, record: dict) -> None:
        for rec in record.get("runs", []):
            try:
                d = self.run_dir(rec)
            except dvcstate.DvcStateError as e:
                self.problems.append(str(e))
                continue
            if not (d / "run.json").exists():
                self.fail(self.rel(d / "run.json") if d.exists() else self.rel(d),
                          f"missing (run {rec.get('run_id')} of this figure)")
                continue
            checked = check_run(d, self.verified_runs)
            # verify()'s findings: one line per file that differs from run.json.
            for p in checked.problems:
                self.problems.append(p.replace(str(checked.path), self.rel(d), 1))
            info = checked.info
            if info is None:
                continue  # verify() named run.json as unreadable
            if info.get("run_id") != rec.get("run_id") or info.get("spec") != rec.get("spec"):
                self.fail(self.rel(d / "run.json"), "run_id or spec differs from the figure's record")
            # Each file now matches run.json unless verify() named it, so the figure's record
            # is compared with run.json's hashes: no file is read again.
            recorded = rec.get("files") or {}
            now = info.get("files") or {}
            for name in sorted(set(recorded) | set(now)):
                f = d / name
                if name not in now:
                    self.fail(self.rel(f), "recorded by the figure but not listed in run.json")
                elif name not in recorded:
                    self.fail(self.rel(f), "listed in run.json but not recorded by the figure")
                elif name in checked.bad_files:
                    continue  # named above, by verify()
                elif now[name] != recorded[name]:
                    self.fail(self.rel(f), "sha256 differs from the one the figure recorded")
                else:
                    self.ok()
            run_json_named = any(p.startswith(str(d / "run.json")) for p in checked.problems)
            if rec.get("run_json_sha256") and checked.run_json_sha256 != rec["run_json_sha256"]:
                if not run_json_named:
                    self.fail(self.rel(d / "run.json"), "differs from the run.json the figure was made from")
            elif not checked.problems:
                self.ok()

    def datasets(self, record: dict) -> None:
        for name, ds in sorted((record.get("datasets") or {}).items()):
            recorded = (ds or {}).get("checksums")
            if not isinstance(recorded, dict):
                self.notes.append(f"dataset {name}: no checksums recorded")
                continue
            published = {}
            if name in ("mnist", "fashion_mnist", "cifar10"):  # importing data loads torch
                published = expected_md5(name)
            for f, md5 in sorted(published.items()):
                if recorded.get(f) != md5:
                    self.fail(f"dataset {name}", f"{f} checksum {recorded.get(f)} is not the "
                                                 f"published {md5}")
                else:
                    self.ok()
            manifest = self.root / "data" / name / "manifest.json"
            if manifest.exists():
                try:
                    files = json.loads(manifest.read_text()).get("files") or {}
                except ValueError as e:
                    self.fail(self.rel(manifest), f"not valid JSON ({e})")
                    continue
                for f in sorted(set(files) | set(recorded)):
                    if files.get(f) != recorded.get(f):
                        self.fail(self.rel(manifest), f"{f} checksum {files.get(f)} differs from "
                                                      f"the figure's {recorded.get(f)}")
                    else:
                        self.ok()

    def dvc_lock(self, record: dict) -> None:
        lock = self.root / "dvc.lock"
        if not lock.exists():
            self.notes.append("dvc.lock: absent (nothing committed to DVC yet)")
            return
        try:
            entries = dvcstate.lock_entries(self.root)
        except dvcstate.DvcStateError as e:
            self.fail("dvc.lock", str(e))
            return
        mine = own_files(self.figure)
        found = False
        for f in mine:
            rel = self.rel(f)
            outs = [entry for entry in entries if entry.path == rel and entry.kind == "out"]
            if not outs or not f.exists():
                continue
            found = True
            digest = dvcstate.md5_file(f)
            for entry in outs:
                if entry.md5 != digest:
                    self.fail(rel, f"md5 {digest} differs from {entry.md5} recorded in dvc.lock "
                                   f"(stage {entry.stage})")
                else:
                    self.ok()
        if not found:
            self.notes.append(f"dvc.lock: {self.rel(self.figure)} not recorded "
                              f"(run `dvc commit` after the pipeline)")
            return
        # Run files against the runs-directory manifest the figure's stage depended on.
        fig_stages = {entry.stage for entry in entries
                      if entry.path == self.rel(self.figure) and entry.kind == "out"}
        # Runs lie in results/: only a directory dependency there (results/runs) holds
        # them. `src` and `workflow` are dependencies git versions; DVC pushes and pulls
        # no file list of them, so none is looked for.
        producers = {entry.path: entry.stage for entry in entries
                     if entry.kind == "out" and entry.md5.endswith(".dir")}
        for dep in entries:
            if dep.stage not in fig_stages or dep.kind != "dep" or not dep.md5.endswith(".dir"):
                continue
            if Path(dep.path).parts[:1] != ("results",):
                continue
            manifest = dvcstate.dir_manifest(self.root, dep.md5)
            if manifest is None:
                stage = producers.get(dep.path)
                fix = (f"`dvc pull {stage}` fetches it" if stage else
                       f"no stage in dvc.lock outputs {dep.path}: `dvc commit -f` its stage "
                       f"(runs) and push it")
                self.notes.append(f"dvc.lock: the file list {dep.md5} of {dep.path} is not in the "
                                  f"DVC cache, so run files are not checked against it; {fix}")
                continue
            base = self.root / dep.path
            for rec in record.get("runs", []):
                try:
                    d = self.run_dir(rec)
                except dvcstate.DvcStateError:
                    continue  # named by runs()
                for name in ["run.json", *sorted(rec.get("files") or {})]:
                    f = d / name
                    try:
                        relpath = str(f.resolve().relative_to(base.resolve()))
                    except ValueError:
                        continue
                    want = manifest.get(relpath)
                    if want is None:
                        self.fail(self.rel(f), f"not in {dep.path} as recorded in dvc.lock "
                                               f"(stage {dep.stage})")
                    elif f.exists() and dvcstate.md5_file(f) != want:
                        self.fail(self.rel(f), f"md5 differs from {dep.path} as recorded in "
                                               f"dvc.lock (stage {dep.stage})")
                    elif f.exists():
                        self.ok()

    def package(self, record: dict) -> None:
        """The sources of the package that made the output (its recorded hash) against the
        checkout's ``src/rankbias``: a copy first on PYTHONPATH, an installed package or an
        image older than the checkout made it otherwise. A record without the hash (written
        before rankbias recorded it) is a note; the git check still applies to it."""
        label = self.rel(self.figure)
        pkg = (record.get("environment") or {}).get("package")
        want = pkg.get("sources_sha256") if isinstance(pkg, dict) else None
        if not isinstance(want, str):
            self.notes.append(f"code: {label}: the sources of the package that made it are not "
                              f"recorded (written by an older rankbias); not compared")
            return
        assert isinstance(pkg, dict)
        src = self.root / "src" / "rankbias"
        if not src.is_dir():
            self.notes.append(f"code: {self.root} has no src/rankbias, so the sources that made "
                              f"{label} (sha256 {want}) are not compared")
            return
        now, _ = P.source_hash(src)
        if now != want:
            self.fail(label, f"made by the package at {pkg.get('location')}, whose sources hash to "
                             f"sha256 {want}; this checkout's src/rankbias hashes to {now}")
        else:
            self.ok()

    def code(self, record: dict) -> None:
        code = (record.get("environment") or {}).get("code") or {}
        commit = code.get("commit")
        now = P.code_version(self.root)
        if commit is None:
            self.notes.append("code: the figure was not made inside a git repository")
            return
        if now["commit"] is None:
            self.fail("code", f"figure made at commit {commit[:12]}, but {self.root} is not "
                              f"a git repository")
            return
        if code.get("dirty"):
            self.fail("code", f"the figure was made from commit {commit[:12]} with uncommitted "
                              f"changes, so its code cannot be verified")
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=self.root,
                               capture_output=True).returncode == 0
        if not known:
            self.fail("code", f"commit {commit[:12]} that made the figure is not in this repository")
            return
        diff = subprocess.run(["git", "diff", "--name-only", commit, "--", ".", *CODE_EXCLUDES],
                              cwd=self.root, capture_output=True, text=True)
        changed = [line for line in diff.stdout.splitlines() if line.strip()]
        for f in changed:
            self.fail(f, f"differs from commit {commit[:12]} that made the figure "
                         f"(HEAD is {now['commit'][:12]}{', dirty' if now['dirty'] else ''})")
        # A new module that git does not track changes the code as much as an edit does;
        # only what .gitignore excludes (outputs, caches) is not code.
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--",
                                    ".", *CODE_EXCLUDES], cwd=self.root, capture_output=True, text=True)
        new = [line for line in untracked.stdout.splitlines() if line.strip()]
        for f in new:
            self.fail(f, f"not tracked by git, so not part of commit {commit[:12]} that made the figure")
        changed += new
        if not changed:
            self.ok()


# -- the readable tree ---------------------------------------------------------------

# A line of a rendered tree: a leaf, or a label with its children.
TreeNode = str | tuple[str, list["TreeNode"]]


def _tree(label: str, children: list[TreeNode]) -> list[str]:
    lines = [label]

    def walk(items: list[TreeNode], prefix: str) -> None:
        for i, item in enumerate(items):
            last = i == len(items) - 1
            head, kids = (item, []) if isinstance(item, str) else item
            lines.append(prefix + ("└── " if last else "├── ") + head)
            if kids:
                walk(kids, prefix + ("    " if last else "│   "))
    walk(children, "")
    return lines


def _code(code: dict) -> str:
    if not code or not code.get("commit"):
        return "not in a git repository"
    describe = code.get("describe") or ""
    extra = f"  ({describe})" if describe and not code["commit"].startswith(describe) else ""
    return f"{code['commit'][:12]}{' dirty' if code.get('dirty') else ''}{extra}"


def _package(pkg) -> str:
    if not isinstance(pkg, dict):
        return "not recorded"
    git = pkg.get("git")
    where = _code(git) if isinstance(git, dict) else str(git)
    return (f"{pkg.get('location')}  sources sha256 {str(pkg.get('sources_sha256'))[:16]}…  "
            f"({where})")


def _env_items(env: dict) -> list[TreeNode]:
    host, dev, cont = env.get("host") or {}, env.get("device") or {}, env.get("container") or {}
    pk = env.get("packages") or {}
    return [
        f"code: {_code(env.get('code') or {})}",
        f"package: {_package(env.get('package'))}",
        f"created: {env.get('created')}",
        f"host: {host.get('hostname')} ({host.get('platform')}, {host.get('cpu_count')} CPUs)",
        f"device: {dev.get('type')} {dev.get('name') or ''}".rstrip(),
        f"container: {cont.get('image') or '-'} {cont.get('image_digest') or '(no image digest)'}",
        ("packages", [f"{k} {v}" for k, v in sorted(pk.items())]),
    ]


def render(figure: Path, record: dict) -> list[str]:
    env = record.get("environment") or {}
    rank = record.get("rank") or {}
    runs: list[TreeNode] = []
    for r in record.get("runs", []):
        s, prov = r.get("spec") or {}, r.get("provenance") or {}
        div = r.get("diverged")
        head = (f"{r.get('run_id')}  {r.get('model') or s.get('arch')}  {s.get('dataset')}  "
                f"{s.get('loss')}  lr={s.get('lr')} wd={s.get('weight_decay')} "
                f"mom={s.get('momentum')} B={s.get('batch_size')} seed={s.get('seed')} "
                f"epochs={r.get('epochs_completed')}/{s.get('epochs')}"
                + (f"  diverged at epoch {div.get('epoch')}" if isinstance(div, dict) else ""))
        kids: list[TreeNode]
        kids = [f"path: {r.get('path')}", f"pack: {r.get('pack_id')}",
                ("files", [f"{n}  sha256 {h[:16]}…" for n, h in sorted((r.get('files') or {}).items())]),
                f"trained with code {_code(prov.get('code') or {})}",
                f"trained on {(prov.get('host') or {}).get('hostname')}, device "
                f"{(prov.get('device') or {}).get('type')} {(prov.get('device') or {}).get('name') or ''}".rstrip(),
                f"trained at {prov.get('created')}"]
        if r.get("wall_time_s") is not None:
            kids.append(f"wall time {r['wall_time_s']:.1f} s (pack {r.get('pack_id')})")
        if r.get("seeds"):
            kids.append("seeds: " + "; ".join(f"{k} {v}" for k, v in sorted(r["seeds"].items())))
        runs.append((head, kids))
    datasets: list[TreeNode]
    datasets = [(f"{n}: {(d or {}).get('source')}",
                 [f"{f}  md5 {c}" for f, c in sorted(((d or {}).get('checksums') or {}).items())])
                for n, d in sorted((record.get("datasets") or {}).items())]
    return _tree(f"{figure}  ({record.get('figure')})", [
        ("made by", _env_items(env)),
        f"ranks: normalise={rank.get('normalise')} tol={rank.get('tol')}",
        ("datasets", datasets or ["none recorded"]),
        (f"runs ({len(runs)})", runs),
    ])


# -- CLI ------------------------------------------------------------------------------

def audit(figure: str | Path, root: str | Path = ".") -> tuple[dict | None, Audit]:
    root = Path(root)
    fig = Path(figure)
    if not fig.is_absolute() and not fig.exists() and (root / fig).exists():
        fig = root / fig
    a = Audit(fig, root)
    record = a.record()
    if record is not None:
        a.runs(record)
        a.datasets(record)
        a.dvc_lock(record)
        a.package(record)
        a.code(record)
    return record, a


def run(args: argparse.Namespace) -> int:
    fig = Path(args.figure)
    if not fig.exists() and not (Path(args.root) / fig).exists():
        print(f"rankbias audit: error: {fig}: no such figure", file=sys.stderr)
        return 2
    if fig.suffix.lower() not in (".png", ".pdf", ".md"):
        print(f"rankbias audit: error: {fig}: expected a .png or .pdf figure or the claims "
              f"table (.md)", file=sys.stderr)
        return 2
    if not Path(args.root).is_dir():
        print(f"rankbias audit: error: --root {args.root}: not a directory", file=sys.stderr)
        return 2
    record, a = audit(fig, args.root)
    if args.json:
        print(json.dumps({"figure": str(fig), "ok": not a.problems, "mismatches": a.problems,
                          "notes": a.notes, "checks_passed": a.checked, "provenance": record},
                         indent=2, sort_keys=True))
    else:
        if record is not None:
            print("\n".join(render(fig, record)))
            print()
        for n in a.notes:
            print(f"note: {n}")
        for p in a.problems:
            print(f"MISMATCH {p}")
        if a.problems:
            print(f"audit: {len(a.problems)} mismatch(es); {a.checked} check(s) passed")
        else:
            print(f"audit: OK, {a.checked} check(s) passed")
    return 1 if a.problems else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("audit", help="show a figure's or the claims' provenance and check it "
                                            "against the tree",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("figure", help="a figure written by `rankbias figure` (.png or .pdf), or the "
                                  "claims table written by `rankbias claims` (.md)")
    p.add_argument("--root", default=".", help="repository root the recorded paths are relative to")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
