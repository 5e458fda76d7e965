"""A figure's provenance as a page a person reads: ``<stem>.provenance.html``.

``rankbias figure`` writes it beside the PNG, the PDF and the sidecar
``<stem>.provenance.json``, and Snakemake's report shows it next to the figure. It is
rendered from the sidecar's record alone, with nothing of its own (no time, no path),
so the same record always gives the same bytes: ``rankbias audit`` renders the record
again and names the page when it differs (stale, edited or missing), and ``rankbias
restore`` moves such a figure aside with the rest of its files.
"""
from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PAGE_SUFFIX = ".provenance.html"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.2em;color:#1e293b;
     background:#fff;font-size:14px;line-height:1.4}
h1{font-size:1.35em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .4em;border-bottom:1px solid #cbd5e1}
table{border-collapse:collapse;margin:.3em 0}th,td{border:1px solid #cbd5e1;padding:2px 6px;
     text-align:left;vertical-align:top}th{background:#f1f5f9}
table.kv th{width:13em}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
.lead{color:#334155}.warn{color:#b91c1c}pre{background:#f8fafc;border:1px solid #e2e8f0;padding:.5em;
     overflow-x:auto;font-size:.85em}details{margin:.4em 0}
""".strip()


def page_path(figure_path: str | Path) -> Path:
    """The page beside a figure: ``<stem>.provenance.html``."""
    p = Path(figure_path)
    return p.with_name(p.stem + PAGE_SUFFIX)


def _e(value: Any) -> str:
    return html.escape("-" if value is None or value == "" else str(value))


def _kv(rows: Iterable[tuple[str, Any]]) -> str:
    return ('<table class="kv">' + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
            + "</table>")


def _table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _mono(value: Any) -> str:
    return f'<span class="mono">{_e(value)}</span>'


def _code(code: Any) -> str:
    if not isinstance(code, Mapping) or not code.get("commit"):
        return "not in a git repository" if isinstance(code, Mapping) else _e(code)
    dirty = ' <span class="warn">with uncommitted changes</span>' if code.get("dirty") else ""
    return f"commit {_mono(code['commit'])} ({_e(code.get('describe'))}){dirty}"


def _distinct(values: Iterable[str]) -> str:
    seen = sorted(set(values))
    return "; ".join(seen) if seen else "-"


def _order(text: str) -> tuple:
    """Numbers by value, then everything else as written."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _specs(runs: list[dict]) -> list[tuple[str, str]]:
    """What the runs' specs share and what they vary."""
    specs = [r.get("spec") or {} for r in runs]
    keys = sorted({k for s in specs for k in s})
    shared: list[tuple[str, list[str]]] = []
    varying: list[tuple[str, list[str]]] = []
    for k in keys:
        values = sorted({json.dumps(s.get(k), sort_keys=True) for s in specs}, key=_order)
        (shared if len(values) == 1 else varying).append((k, values))
    return [("varying", ", ".join(f"{_e(k)} &isin; {{{_e(', '.join(v))}}}" for k, v in varying) or "nothing"),
            ("shared", ", ".join(f"{_e(k)}={_e(v[0])}" for k, v in shared) or "-")]


def _run_row(r: dict) -> list[str]:
    s, prov = r.get("spec") or {}, r.get("provenance") or {}
    div = r.get("diverged")
    outcome = _e(r.get("status"))
    if isinstance(div, Mapping):
        outcome += f' <span class="warn">diverged at epoch {_e(div.get("epoch"))}</span>'
    wall = r.get("wall_time_s")
    seeds = r.get("seeds")
    return [_mono(r.get("run_id")), _e(r.get("model") or s.get("arch")), _e(s.get("dataset")),
            _e(s.get("loss")), _e(s.get("lr")), _e(s.get("weight_decay")), _e(s.get("momentum")),
            _e(s.get("batch_size")), _e(s.get("seed")),
            f"{_e(r.get('epochs_completed'))}/{_e(s.get('epochs'))}", outcome,
            _e(r.get("device") or (prov.get("device") or {}).get("type")),
            _e(f"{wall:.1f}" if isinstance(wall, (int, float)) else None), _mono(r.get("pack_id")),
            _e("; ".join(f"{k}: {v}" for k, v in sorted(seeds.items())) if isinstance(seeds, Mapping)
               else seeds)]


RUN_COLUMNS = ["run_id", "model", "dataset", "loss", "lr", "weight decay", "momentum", "B", "seed",
               "epochs", "status", "device", "wall time (s, pack)", "pack", "seeds"]


def render(record: Mapping[str, Any]) -> str:
    """The page for one figure's provenance record (a sidecar's content)."""
    name = str(record.get("figure") or "?")
    env = record.get("environment") or {}
    runs = [r for r in record.get("runs") or [] if isinstance(r, dict)]
    config = record.get("config") or {}
    missing = config.get("missing_runs") or []
    diverged = [r for r in runs if isinstance(r.get("diverged"), Mapping)]
    host, dev, cont = env.get("host") or {}, env.get("device") or {}, env.get("container") or {}
    pkg: Mapping[str, Any] = env["package"] if isinstance(env.get("package"), Mapping) else {}
    provs = [r.get("provenance") or {} for r in runs]
    numerics = [p.get("numerics") or {} for p in provs]
    walls = [r["wall_time_s"] for r in runs if isinstance(r.get("wall_time_s"), (int, float))]
    rank = record.get("rank") or {}

    parts = [f"<h1>Provenance of {_e(name)}</h1>",
             f'<p class="lead">{len(runs)} run(s) drawn'
             + (f', <span class="warn">{len(diverged)} diverged</span>' if diverged else "")
             + (f', <span class="warn">{len(missing)} missing</span>' if missing else "")
             + f"; drawn {_e(env.get('created'))}, code: {_code(env.get('code'))}. "
             f"<code>rankbias audit results/figures/{_e(name)}.png</code> checks all of this "
             f"against the tree. Rendered from <code>{_e(name)}.provenance.json</code>, which the "
             f"PNG and PDF embed.</p>"]
    parts += ["<h2>Code</h2>", _kv([
        ("the checkout", _code(env.get("code"))),
        ("the package that ran", _e(pkg.get("location"))),
        ("its sources (sha256)", f"{_mono(pkg.get('sources_sha256'))} over {_e(pkg.get('files'))} files"),
        ("its git state", _code(pkg.get("git"))),
        ("training code (runs)", _distinct(_code(p.get("code")) for p in provs)),
        ("training sources (runs)", _distinct(_mono((p.get("package") or {}).get("sources_sha256"))
                                              for p in provs)),
    ])]
    parts += ["<h2>Environment</h2>", _kv([
        ("container image", f"{_e(cont.get('image'))} {_mono(cont.get('image_digest') or '(no image digest)')}"
                            f" (runtime {_e(cont.get('runtime'))})"),
        ("host (figure)", f"{_e(host.get('hostname'))}, {_e(host.get('platform'))}, "
                          f"{_e(host.get('cpu_count'))} CPUs"),
        ("device (figure)", f"{_e(dev.get('type'))} {_e(dev.get('name'))}"),
        ("training hosts", _distinct(_e((p.get("host") or {}).get("hostname")) for p in provs)),
        ("training devices", _distinct(f"{_e((p.get('device') or {}).get('type'))} "
                                       f"{_e((p.get('device') or {}).get('name'))}" for p in provs)),
        ("training images", _distinct(_mono((p.get("container") or {}).get("image_digest")) for p in provs)),
        ("determinism, precision", _distinct(f"deterministic={_e(n.get('deterministic'))}, "
                                             f"precision={_e(n.get('precision'))}" for n in numerics)),
        ("CPU threads (training)", _distinct(_e(n.get("cpu_threads", "(not recorded)")) for n in numerics)),
        ("trained", _distinct(_e(p.get("created")) for p in provs)),
        ("wall time (per pack)", f"{min(walls):.1f}-{max(walls):.1f} s" if walls else "-"),
    ])]
    packages = env.get("packages") or {}
    parts += ["<h2>Package versions</h2>",
              _table(["package", "version (figure)", "version (training)"],
                     [[_e(k), _e(v), _distinct(_e((p.get("packages") or {}).get(k)) for p in provs)]
                      for k, v in sorted(packages.items())])]
    parts += ["<h2>Datasets</h2>"]
    datasets = record.get("datasets") or {}
    if datasets:
        for ds_name, ds in sorted(datasets.items()):
            ds = ds or {}
            sums = ds.get("checksums") or {}
            parts.append(f"<p><b>{_e(ds_name)}</b> from {_e(ds.get('source'))}</p>"
                         + _table(["file", "md5"], [[_e(f), _mono(c)] for f, c in sorted(sums.items())]))
    else:
        parts.append("<p>none recorded (a generated dataset)</p>")
    parts += ["<h2>Ranks</h2>", _kv([(k, _e(rank.get(k))) for k in ("measure", "normalise", "tol", "conv")])]
    parts += [f"<h2>Runs ({len(runs)})</h2>", _kv(_specs(runs)), _table(RUN_COLUMNS, [_run_row(r) for r in runs])]
    if missing:
        parts.append('<p class="warn">Not available when the figure was drawn: '
                     + ", ".join(_mono(m) for m in missing) + "</p>")
    parts += ["<h2>Records</h2>",
              "<details><summary>The figure's config</summary><pre>"
              + _e(json.dumps(config, indent=2, sort_keys=True, default=str)) + "</pre></details>",
              f"<details><summary>The whole record ({_e(name)}.provenance.json): every run file's "
              "sha256 and each run's own provenance</summary><pre>"
              + _e(json.dumps(record, indent=2, sort_keys=True, default=str)) + "</pre></details>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Provenance of {_e(name)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def page_bytes(record: Mapping[str, Any]) -> bytes:
    """What ``rankbias figure`` writes, and what ``rankbias audit`` expects, as the page."""
    return render(record).encode()
