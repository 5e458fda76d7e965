"""`rankbias restore`: make results pulled with DVC usable by Snakemake, verified.

A `dvc pull` brings files, not Snakemake's view of them: timestamps come out in
arbitrary order and ``.snakemake/`` metadata is absent, so a plain `snakemake` would
redraw or retrain what it need not. Touching everything would hide a corrupt or
tampered file. So restore

  1. checks every output recorded in ``dvc.lock`` against its md5 (a directory
     against the file list DVC stored for it); a file that differs is named, and so is
     a corrupt object in the DVC cache (for the user to delete: restore changes nothing
     outside data/ and results/). A path that does not resolve inside the repository's
     data/ or results/ (absolute, ``../``) is an error naming the entry, and is not
     touched;
  2. verifies every run under ``results/runs``: run.json readable and unedited (its
     ``record_sha256``), its run_id the hash of its spec and its directory name, every
     file's sha256 as recorded;
  3. verifies every figure and the claims table, each as one set of files (PNG, PDF,
     provenance sidecar and the page rendered from it; claims.md, claims.json and
     sidecar): all present, the sidecar equal to what the PNG and PDF embed and the page
     to what it renders (the claims' sidecar: the sha256 of
     claims.md and claims.json), every run it records present with the same hashes, and
     the sources of the package that made it equal to the checkout's ``src/rankbias``
     (its recorded sha256);
  4. moves whatever failed to ``results/quarantine/<time>/`` (named in the report),
     together with every output Snakemake derives from it, so `snakemake` rebuilds
     exactly those;
  5. runs ``snakemake --touch`` so the verified outputs are up to date in Snakemake's
     eyes (timestamps in DAG order, metadata recorded).

Restore acts on nothing through a symbolic link: a result that is a link, or lies
beneath one, is an error naming the link, and neither the link nor its target is
checked or moved (moving what a link resolves to would move whatever it points at: a
file outside the repository, a shared DVC cache object). So a DVC ``cache.type``
with symlink is refused before anything is checked, and ``results/quarantine`` must be
a real directory. When something could not be checked or moved, ``snakemake --touch``
is not run: it would mark that thing up to date.

Exit status: 0 everything verified; 1 something failed verification (moved aside and
reported: the next `snakemake` retrains or redraws it); 2 bad usage.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rankbias.verify import dvcstate
from rankbias.verify.audit import Audit, is_table, own_files
from rankbias.verify.dvcstate import DvcStateError, cache_dir, cache_object, dir_manifest, first_link, md5_file, repo_path
from rankbias.store.provenance import rel_path
from rankbias.store.results import NOT_TRAINED, RunError, check_run, ledger_path, record_trained, trained_sha256
from rankbias.store.provenance_page import PAGE_SUFFIX

RUNS_DIR = Path("results/runs")
FIGURES_DIR = Path("results/figures")
QUARANTINE_DIR = Path("results/quarantine")
CLAIMS_MD = Path("results/claims.md")


# -- verification ----------------------------------------------------------------------

@dataclass
class Report:
    root: Path
    problems: list[str] = field(default_factory=list)   # what failed, one line each
    bad: set[Path] = field(default_factory=set)          # files/dirs to move aside
    actions: list[str] = field(default_factory=list)
    verified_runs: int = 0
    verified_figures: int = 0
    # Files whose md5 equals the one dvc.lock records (what was committed and pulled).
    lock_matched: set[Path] = field(default_factory=set)
    # Run directories checked so far (resolved path -> results.CheckedRun): each run is
    # verified once, by check_runs, and its result reused for every figure drawn from it.
    runs: dict = field(default_factory=dict)
    links: set[Path] = field(default_factory=set)        # symbolic links named so far
    # Something failed that restore could not move aside: `snakemake --touch` would mark
    # it up to date, so it is not run.
    blocked: bool = False

    def rel(self, p: Path) -> str:
        # As written, not resolved: a link is named as the link, not as its target.
        try:
            return Path(p).relative_to(self.root).as_posix()
        except ValueError:
            return rel_path(p, self.root)

    def linked(self, p: Path) -> bool:
        """Whether `p` is a symbolic link or lies beneath one (the link is named, once)."""
        link = first_link(self.root, p)
        if link is None:
            return False
        self.blocked = True
        if link not in self.links:
            self.links.add(link)
            kind = "directory" if link.is_dir() else "file"
            detail = (f"a symbolic link (to {os.readlink(link)}); expected a real {kind} inside "
                      f"the repository: restore checks and moves nothing through a link, so the "
                      f"link, its target and what lies beneath are left as they are")
            cache = cache_dir(self.root).resolve()
            if cache == link.resolve() or cache in link.resolve().parents:
                detail += ("; it points into the DVC cache: set `dvc config cache.type reflink,copy` "
                           "and run `dvc checkout --relink`")
            self.fail(link, detail)
        return True

    def fail(self, path: Path | str, detail: str, bad: Path | None = None) -> None:
        self.problems.append(f"{self.rel(Path(path)) if isinstance(path, Path) else path}: {detail}")
        if bad is not None:
            self.bad.add(bad)


def _owner(root: Path, f: Path) -> Path:
    """What to move aside when file `f` is bad: its run directory, or the file itself (a
    figure's other files follow it, as one set, in check_figures)."""
    try:
        rel = f.relative_to(root / RUNS_DIR)  # as written: `f` was checked for links
        return root / RUNS_DIR / rel.parts[0]
    except (ValueError, IndexError):
        return f


def check_dvc_outputs(rep: Report) -> None:
    root = rep.root
    if not (root / "dvc.lock").exists():
        return
    try:
        entries = dvcstate.lock_entries(root)
    except DvcStateError as e:
        rep.fail("dvc.lock", str(e))
        return
    seen: set[str] = set()
    for out in entries:
        if out.kind != "out" or out.path in seen:
            continue
        seen.add(out.path)
        entry = f"dvc.lock stage {out.stage} out {out.path!r}"
        p = root / out.path
        if rep.linked(p):
            continue
        try:
            repo_path(root, out.path, entry)
            dvcstate.check_md5(out.md5, entry)
        except DvcStateError as err:
            rep.fail("dvc.lock", str(err))
            continue
        if out.md5.endswith(".dir"):
            manifest = dir_manifest(root, out.md5)
            if manifest is None:
                rep.fail(out.path, f"the file list {out.md5} recorded in dvc.lock is not in the DVC "
                                 f"cache; run `dvc pull` (files inside are still verified below)")
                continue
            files = []
            for rel, md5 in sorted(manifest.items()):
                where = f"{entry}: file list {out.md5} entry {rel!r}"
                if rep.linked(p / rel):
                    continue
                try:
                    repo_path(root, Path(out.path) / rel, where)
                    files.append((p / rel, dvcstate.check_md5(md5, where)))
                except DvcStateError as err:
                    rep.fail("dvc.lock", str(err))
        else:
            files = [(p, out.md5)]
        for f, want in files:
            if not f.exists():
                rep.fail(f, f"recorded in dvc.lock (stage {out.stage}) but missing; `dvc pull` "
                            f"did not restore it")
                continue
            got = md5_file(f)
            if got == want:
                rep.lock_matched.add(Path(os.path.abspath(f)))
                continue
            detail = f"md5 {got} differs from {want} recorded in dvc.lock (stage {out.stage})"
            obj = cache_object(root, want)
            if obj.is_file() and md5_file(obj) != want:
                # Reported, not deleted: restore changes nothing outside data/ and results/,
                # and a cache may be shared with other repositories.
                detail += (f"; the DVC cache object {rep.rel(obj)} is corrupt: delete it, then "
                           f"`dvc pull` fetches it again")
            rep.fail(f, detail, bad=_owner(root, f))


def check_runs(rep: Report, vouch: bool = True) -> set[str]:
    """Verify every run directory; returns the run_ids that failed.

    A run.json that equals the one dvc.lock records is vouched for by the committed
    dvc.lock: its training record (results.ledger_dir) is written when it has none or a
    different one (a run pulled, or checked out over one trained here), with `vouch`."""
    failed: set[str] = set()
    runs_dir = rep.root / RUNS_DIR
    if rep.linked(runs_dir) or not runs_dir.is_dir():
        return failed
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir() or p.is_symlink()):
        if d in rep.bad or rep.linked(d):
            failed.add(d.name)
            continue
        try:
            repo_path(rep.root, d, f"run directory {d.name}")
        except DvcStateError as err:
            rep.fail(d, str(err), bad=d)
            failed.add(d.name)
            continue
        if not (d / "run.json").exists():
            rep.fail(d, "incomplete run (no run.json)", bad=d)
            failed.add(d.name)
            continue
        checked = check_run(d, rep.runs)
        if Path(os.path.abspath(d / "run.json")) in rep.lock_matched:
            checked.problems = [p for p in checked.problems if NOT_TRAINED not in p]
            if not checked.problems and vouch:
                try:
                    if trained_sha256(d) != checked.run_json_sha256:
                        record_trained(d, by="rankbias restore (equals dvc.lock)")
                        rep.actions.append(f"recorded {rep.rel(d / 'run.json')} as verified "
                                           f"against dvc.lock in {rep.rel(ledger_path(d))}")
                except (RunError, OSError) as err:
                    rep.fail(ledger_path(d), f"cannot record the run as verified ({err})")
        problems = checked.problems
        for p in problems:
            rep.fail(d, p.replace(str(d) + "/", "").replace(str(d), "run.json"), bad=d)
        if problems:
            failed.add(d.name)
        else:
            rep.verified_runs += 1
    return failed


def _there(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def output_sets(rep: Report) -> list[list[Path]]:
    """The files of every figure (PNG, PDF, sidecar, page) and of the claims (claims.md,
    claims.json, sidecar) of which any one is present: each set is checked as one, so a
    member missing is found from the others."""
    sets = []
    fig_dir = rep.root / FIGURES_DIR
    if not rep.linked(fig_dir) and fig_dir.is_dir():
        stems = {p.name[: -len(suffix)] for suffix in (".png", ".pdf", ".provenance.json", PAGE_SUFFIX)
                 for p in fig_dir.glob("*" + suffix)}
        sets += [own_files(fig_dir / (stem + ".png")) for stem in sorted(stems)]
    claims = own_files(rep.root / CLAIMS_MD)
    if any(_there(x) for x in claims):
        sets.append(claims)
    return sets


def check_figures(rep: Report, failed_runs: set[str]) -> None:
    """Verify every figure and the claims table against their provenance records."""
    for files in output_sets(rep):
        linked = [x for x in files if rep.linked(x)]
        trio = [x for x in files if _there(x) and x not in linked]
        if linked:
            rep.bad.update(trio)  # the link is named and left; the set is not verified
            continue
        # The claims' audit names a missing claims.md or claims.json itself; a figure's,
        # a missing other image, given one of them.
        output = files[0] if is_table(files[0]) else next((x for x in files[:2] if x.exists()), None)
        if output is None:
            rep.fail(files[0], f"missing, and so is {rep.rel(files[1])}: expected the PNG and the "
                               f"PDF beside {', '.join(rep.rel(x) for x in trio)}")
            rep.bad.update(trio)
            continue
        a = Audit(output, rep.root, runs=rep.runs)
        record = a.record()
        if record is not None:
            used = {r.get("run_id") for r in record.get("runs", [])}
            stale = sorted(used & failed_runs)
            if stale:
                a.problems.append(f"{a.rel(output)}: drawn from run(s) that failed verification: "
                                  f"{', '.join(stale)}")
            else:
                a.runs(record)
            a.package(record)
        if any(x in rep.bad for x in trio):
            a.problems.append(f"{a.rel(output)}: files differ from dvc.lock")
        for p in a.problems:
            rep.problems.append(p)
        if a.problems:
            rep.bad.update(trio)
        else:
            rep.verified_figures += 1


# -- acting on the findings ----------------------------------------------------------

def _snakemake(root: Path, args: list[str], extra: list[str]) -> subprocess.CompletedProcess:
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    # The user's arguments first: `extra` may end in an option that takes a list.
    return subprocess.run([exe, *args, *extra], cwd=root, capture_output=True, text=True)


_JOB_RE = re.compile(r"^(?:local)?(?:checkpoint|rule) (\S+):\s*$")


def planned_outputs(dry_run: str) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of each job in the text of a `snakemake -n` run."""
    jobs: list[tuple[str, list[str]]] = []
    rule = None
    for line in dry_run.splitlines():
        m = _JOB_RE.match(line)
        if m:
            rule = m.group(1)
            jobs.append((rule, []))
        elif rule and line.strip().startswith("output:"):
            jobs[-1][1].extend(x.strip() for x in line.split(":", 1)[1].split(",") if x.strip())
        elif not line.startswith(" "):
            rule = None
    return jobs


def downstream(rep: Report, moved: list[Path], snakemake_args: list[str]) -> list[Path]:
    """Existing outputs of jobs Snakemake would rerun because `moved` files are gone."""
    root = rep.root
    forced = []
    for p in moved:
        if p.is_dir() or p.parent == root / RUNS_DIR:
            forced.append(p / "run.json")
        else:
            forced.append(p)
    forced_rel = [rep.rel(f) for f in forced]
    if not (root / "Snakefile").exists() and not (root / "workflow" / "Snakefile").exists():
        return []
    proc = _snakemake(root, snakemake_args, ["-n", "--cores", "1", "--forcerun", *forced_rel])
    if proc.returncode != 0:
        rep.problems.append("snakemake: could not list the outputs derived from the failed files "
                            f"(`snakemake -n --forcerun ...` exit {proc.returncode}): "
                            + " ".join((proc.stderr + proc.stdout).strip().splitlines()[-3:]))
        return []
    out: list[Path] = []
    forced_set = set(forced_rel)
    for _rule, outputs in planned_outputs(proc.stdout + "\n" + proc.stderr):
        if forced_set & set(outputs):
            continue  # the job that regenerates a moved file; its other outputs stay
        out.extend(root / o for o in outputs if (root / o).exists())
    return out


def quarantine_refused(rep: Report) -> bool:
    """Whether ``results/quarantine`` cannot take what failed: it must be a real directory
    inside the repository (or not exist yet), not a link that would carry files outside."""
    q = rep.root / QUARANTINE_DIR
    if rep.linked(q):
        return True
    if _there(q) and not q.is_dir():
        rep.fail(q, "not a directory; expected a real directory inside the repository to move "
                    "what failed verification into")
        rep.blocked = True
        return True
    return False


def quarantine(rep: Report, paths: list[Path], stamp: str) -> list[Path]:
    moved = []
    base = rep.root / QUARANTINE_DIR / stamp
    for p in sorted(set(paths)):
        if not _there(p):
            continue
        # Checked again here, at the only place that moves files: whatever the findings
        # name, nothing outside data/ and results/ and nothing through a link is moved.
        if rep.linked(p):
            continue
        try:
            repo_path(rep.root, p, f"move {rep.rel(p)}")
            # The destination from the path as written (no link on it, so `..` is plain),
            # never from a resolved one: that would be a link's target.
            rel = Path(os.path.normpath(p.relative_to(rep.root)))
        except (DvcStateError, ValueError) as err:
            rep.problems.append(f"move {p}: {err}" if isinstance(err, ValueError) else str(err))
            rep.blocked = True
            continue
        dest = base / (rel.relative_to("results") if rel.parts[:1] == ("results",) else rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if _there(dest) or first_link(rep.root, dest.parent) is not None:
            rep.fail(p, f"not moved: {rep.rel(dest)} exists or lies beneath a link; expected a "
                        f"new path in {rep.rel(base)}")
            rep.blocked = True
            continue
        shutil.move(str(p), str(dest))
        rep.actions.append(f"moved {rep.rel(p)} to {rep.rel(dest)}")
        moved.append(p)
    return moved


def restore(root: str | Path = ".", snakemake_args: list[str] | None = None, pull: bool = False,
            check_only: bool = False, touch: bool = True) -> Report:
    root = Path(root)
    snakemake_args = list(snakemake_args or [])
    rep = Report(root)
    if pull:
        proc = subprocess.run(["dvc", "pull"], cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            rep.problems.append(f"dvc pull: exit {proc.returncode}: "
                                + " ".join(proc.stderr.strip().splitlines()[-3:]))
    types = dvcstate.cache_types(root)
    if "symlink" in types:
        rep.fail(".dvc/config", f"cache.type {','.join(types)!r} lets DVC check results out as "
                                f"links into its cache, and restore acts on nothing through a link "
                                f"(moving one aside could destroy a shared cache object); expected "
                                f"copy or reflink: `dvc config cache.type reflink,copy` then `dvc "
                                f"checkout --relink`. Nothing was checked or moved")
        return rep
    no_quarantine = quarantine_refused(rep)
    check_dvc_outputs(rep)
    failed = check_runs(rep, vouch=not check_only)
    check_figures(rep, failed)
    if check_only:
        return rep
    if no_quarantine and rep.bad:
        rep.actions.append(f"moved nothing aside ({len(rep.bad)} path(s) failed): "
                           f"{QUARANTINE_DIR} is refused above")
        rep.bad.clear()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = quarantine(rep, sorted(rep.bad), stamp)
    if moved:
        derived = downstream(rep, moved, snakemake_args)
        for p in quarantine(rep, derived, stamp):
            rep.problems.append(f"{rep.rel(p)}: derived from a file that failed verification")
    if touch and rep.blocked:
        rep.actions.append("did not run snakemake --touch: what failed above and could not be "
                           "checked or moved aside would be marked up to date")
    elif touch and ((root / "Snakefile").exists() or (root / "workflow" / "Snakefile").exists()):
        proc = _snakemake(root, snakemake_args, ["--touch", "--cores", "1"])
        if proc.returncode != 0:
            raise RuntimeError("snakemake --touch failed (exit %d):\n%s"
                               % (proc.returncode, proc.stderr.strip()[-2000:]))
        rep.actions.append("marked the verified outputs up to date (snakemake --touch)")
    return rep


# -- CLI ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if not root.is_dir():
        print(f"rankbias restore: error: --root {root}: not a directory", file=sys.stderr)
        return 2
    sm_args = list(args.snakemake_args or [])
    if sm_args and sm_args[0] == "--":
        sm_args = sm_args[1:]
    rep = restore(root, sm_args, pull=args.pull, check_only=args.check, touch=not args.no_touch)
    for p in rep.problems:
        print(f"FAILED {p}")
    for a in rep.actions:
        print(a)
    print(f"restore: {rep.verified_runs} run(s) and {rep.verified_figures} figure(s) verified; "
          f"{len(rep.problems)} problem(s)"
          + ("" if not rep.problems or args.check else
             "; the next `snakemake` retrains or redraws what was moved aside"))
    return 1 if rep.problems else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "restore", help="verify results pulled with DVC and mark them up to date for Snakemake",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to snakemake (e.g. -- --configfile .test/config.yaml).")
    p.add_argument("--root", default=".", help="repository root (default: .)")
    p.add_argument("--pull", action="store_true", help="run `dvc pull` first")
    p.add_argument("--check", action="store_true", help="verify only; move and touch nothing")
    p.add_argument("--no-touch", action="store_true", help="do not run `snakemake --touch`")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                   help="arguments for snakemake, after --")
    p.set_defaults(func=run)
