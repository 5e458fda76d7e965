"""`rankbias restore`: make results pulled with DVC usable by Snakemake, verified.

A `dvc pull` brings files, not Snakemake's view of them: timestamps come out in
arbitrary order and ``.snakemake/`` metadata is absent, so a plain `snakemake` would
redraw or retrain what it need not. Touching everything would hide a corrupt or
tampered file. So restore

  1. checks every output recorded in ``dvc.lock`` against its md5 (a directory
     against the file list DVC stored for it); a file that differs is named, and a
     corrupt object in the DVC cache is removed so the next `dvc pull` fetches it again.
     A path that does not resolve inside the repository's data/ or results/ (absolute,
     ``../``, through a symbolic link) is an error naming the entry, and is not touched;
  2. verifies every run under ``results/runs``: run.json readable and unedited (its
     ``record_sha256``), its run_id the hash of its spec and its directory name, every
     file's sha256 as recorded;
  3. verifies every figure and the claims table: provenance sidecar equal to what the
     PNG and PDF embed (the claims' sidecar: the sha256 of claims.md and claims.json),
     every run it records present with the same hashes, and the sources of the package
     that made it equal to the checkout's ``src/rankbias`` (its recorded sha256);
  4. moves whatever failed to ``results/quarantine/<time>/`` (named in the report),
     together with every output Snakemake derives from it, so `snakemake` rebuilds
     exactly those;
  5. runs ``snakemake --touch`` so the verified outputs are up to date in Snakemake's
     eyes (timestamps in DAG order, metadata recorded).

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

from . import dvcstate
from .audit import Audit, own_files
from .dvcstate import DvcStateError, cache_object, dir_manifest, md5_file, repo_path
from .provenance import rel_path
from .results import NOT_TRAINED, RunError, check_run, ledger_path, record_trained, trained_sha256

RUNS_DIR = Path("results/runs")
FIGURES_DIR = Path("results/figures")
QUARANTINE_DIR = Path("results/quarantine")
CLAIMS_SIDECAR = Path("results/claims.provenance.json")


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

    def rel(self, p: Path) -> str:
        return rel_path(p, self.root)

    def fail(self, path: Path | str, detail: str, bad: Path | None = None) -> None:
        self.problems.append(f"{self.rel(Path(path)) if isinstance(path, Path) else path}: {detail}")
        if bad is not None:
            self.bad.add(bad)


def _owner(root: Path, f: Path) -> Path:
    """What to move aside when file `f` is bad: its run directory, or the figure with its
    sidecar and other format, or the file itself."""
    try:
        rel = f.resolve().relative_to((root / RUNS_DIR).resolve())
        return root / RUNS_DIR / rel.parts[0]
    except (ValueError, IndexError):
        return f


def check_dvc_outputs(rep: Report, fix_cache: bool = True) -> None:
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
        try:
            repo_path(root, out.path, entry)
            dvcstate.check_md5(out.md5, entry)
        except DvcStateError as err:
            rep.fail("dvc.lock", str(err))
            continue
        p = root / out.path
        if out.md5.endswith(".dir"):
            manifest = dir_manifest(root, out.md5)
            if manifest is None:
                rep.fail(out.path, f"the file list {out.md5} recorded in dvc.lock is not in the DVC "
                                 f"cache; run `dvc pull` (files inside are still verified below)")
                continue
            files = []
            for rel, md5 in sorted(manifest.items()):
                where = f"{entry}: file list {out.md5} entry {rel!r}"
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
            if obj.is_file() and not obj.is_symlink() and md5_file(obj) != want:
                detail += f"; the DVC cache object {rep.rel(obj)} is corrupt"
                if not fix_cache:
                    rep.fail(f, detail, bad=_owner(root, f))
                    continue
                detail += " and was removed (`dvc pull` fetches it again)"
                try:
                    obj.chmod(0o644)
                    obj.unlink()
                except OSError as err:
                    detail += f" (could not remove it: {err})"
            rep.fail(f, detail, bad=_owner(root, f))


def check_runs(rep: Report, vouch: bool = True) -> set[str]:
    """Verify every run directory; returns the run_ids that failed.

    A run.json that equals the one dvc.lock records is vouched for by the committed
    dvc.lock: its training record (results.ledger_dir) is written when it has none or a
    different one (a run pulled, or checked out over one trained here), with `vouch`."""
    failed: set[str] = set()
    runs_dir = rep.root / RUNS_DIR
    if not runs_dir.is_dir():
        return failed
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if d in rep.bad:
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


def recorded_outputs(root: Path) -> list[tuple[Path, Path | None]]:
    """(sidecar, output it describes or None when absent) for every figure and the claims."""
    found = []
    fig_dir = root / FIGURES_DIR
    for side in sorted(fig_dir.glob("*.provenance.json")) if fig_dir.is_dir() else []:
        stem = side.name[: -len(".provenance.json")]
        png, pdf = side.with_name(stem + ".png"), side.with_name(stem + ".pdf")
        found.append((side, png if png.exists() else pdf if pdf.exists() else None))
    claims_side = root / CLAIMS_SIDECAR
    if claims_side.exists():
        md = claims_side.with_name("claims.md")
        found.append((claims_side, md if md.exists() else None))
    return found


def check_figures(rep: Report, failed_runs: set[str]) -> None:
    """Verify every figure and the claims table against their provenance records."""
    for side, output in recorded_outputs(rep.root):
        if output is None:
            rep.fail(side, "provenance sidecar without the output it describes", bad=side)
            continue
        trio = [x for x in own_files(output) if x.exists()]
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


def quarantine(rep: Report, paths: list[Path], stamp: str) -> list[Path]:
    moved = []
    base = rep.root / QUARANTINE_DIR / stamp
    for p in sorted(set(paths)):
        if not p.exists() and not p.is_symlink():
            continue
        try:
            # Checked again here, at the only place that moves files: whatever the
            # findings name, nothing outside data/ and results/ is moved.
            repo_path(rep.root, p.parent, f"move {p}")
        except DvcStateError as err:
            rep.problems.append(str(err))
            continue
        rel = Path(rep.rel(p))
        dest = base / (rel.relative_to("results") if rel.parts[:1] == ("results",) else rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
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
    check_dvc_outputs(rep, fix_cache=not check_only)
    failed = check_runs(rep, vouch=not check_only)
    check_figures(rep, failed)
    if check_only:
        return rep
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = quarantine(rep, sorted(rep.bad), stamp)
    if moved:
        derived = downstream(rep, moved, snakemake_args)
        for p in quarantine(rep, derived, stamp):
            rep.problems.append(f"{rep.rel(p)}: derived from a file that failed verification")
    if touch and ((root / "Snakefile").exists() or (root / "workflow" / "Snakefile").exists()):
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
