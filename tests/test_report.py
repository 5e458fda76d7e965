"""Snakemake's report of the tiny pipeline, made by the real `snakemake --report`: the
claims table as a page of its own, the figures in their groups under their names with
what this run measured for the claims each shows and their readable provenance beside
them, and captions that state no conclusion."""
from __future__ import annotations

import base64
import html
import json
import re

import pytest
from conftest import TEST_CONFIG, snakemake

from rankbias.analysis import claims
from rankbias.plan import sweep
from rankbias.store import provenance
from rankbias.store.provenance_page import page_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tiny_pipeline, tmp_path_factory):
    wd, _ = tiny_pipeline
    out = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(wd, "--configfile", TEST_CONFIG, "--report", str(out))
    return wd, out.read_text()


def report_data(text: str, name: str) -> dict:
    """The report's `var <name> = {...};` (its categories or results) as JSON."""
    m = re.search(r"var " + name + r" = (\{.*?\});\s*</script>", text, re.S)
    assert m, f"no `var {name}` in the report"
    return json.loads(m.group(1))


def test_figures_are_grouped_in_subcategories_from_the_registry(report):
    wd, text = report
    categories = report_data(text, "categories")
    names = sweep.figure_names(sweep.plan_from_file(wd / TEST_CONFIG))
    want: dict[str, list[str]] = {}
    for name in names:
        want.setdefault(sweep.figure_group(name), []).extend(
            [f"results/figures/{name}.png", f"results/figures/{name}.provenance.html"])
    assert {k: sorted(v) for k, v in categories["Figures"].items()} == {k: sorted(v) for k, v in want.items()}
    assert set(want) == {"Paper figures", "Theory", "Summaries"}   # the tiny config draws all three
    assert categories["Claims"] == {"Other": ["results/claims.html"]}
    entry = report_data(text, "results")["results/claims.html"]
    assert entry["labels"] == {"table": "Measured verdicts on the paper's claims"}


def test_each_figure_has_its_readable_provenance_beside_it(report):
    wd, text = report
    results = report_data(text, "results")
    for name in sweep.figure_names(sweep.plan_from_file(wd / TEST_CONFIG)):
        figure = results[f"results/figures/{name}.png"]
        page = results[f"results/figures/{name}.provenance.html"]
        # One row per figure: the same labels but `view`, which the report shows as a switch.
        assert figure["labels"] == {**page["labels"], "view": "figure"} and page["labels"]["view"] == "provenance"
        # The figure's caption links its page.
        assert f"app.showResultInfo('results/figures/{name}.provenance.html')" in figure["caption"]
        # The page in the report is the one rendered from the figure's record, and names its runs.
        content = base64.b64decode(page["data_uri"].split("base64,", 1)[1])
        record = provenance.read_sidecar(wd / "results/figures" / f"{name}.png")
        assert content == page_bytes(record) == (wd / "results/figures" / f"{name}.provenance.html").read_bytes()
        assert record["runs"] and all(r["run_id"] in content.decode() for r in record["runs"])
        assert set(record["runs"][0]["files"].values()) <= set(re.findall(r"[0-9a-f]{64}", content.decode()))


def test_claims_table_is_a_page_of_the_report(report):
    wd, text = report
    assert '"name": "claims.html"' in text or "claims.html" in text
    page = (wd / "results" / "claims.html").read_text()
    result = json.loads((wd / "results" / "claims.json").read_text())
    assert "<table>" in page
    for c in result["claims"]:
        assert f"<td>{c['id']}</td>" in page and f"<strong>{c['verdict']}</strong>" in page


def test_figures_are_named_and_labelled_with_what_was_measured(report):
    wd, text = report
    result = json.loads((wd / "results" / "claims.json").read_text())
    labels = [json.loads("{" + m + "}") for m in re.findall(r'"labels": \{([^{}]*)\}', text)]
    by_figure = {l["figure"]: l for l in labels if "measured" in l}
    names = sweep.figure_names(sweep.plan_from_file(wd / TEST_CONFIG))
    assert set(by_figure) == {f"Figure {name[3:]}" for name in names}, labels
    for name in names:
        measured = by_figure[f"Figure {name[3:]}"]["measured"]
        assert measured == claims.measured(result, name)
        for cid in claims.FIGURE_CLAIMS.get(name, ()):
            verdict = next(c["verdict"] for c in result["claims"] if c["id"] == cid)
            assert f"{cid} {verdict}:" in measured


def test_captions_state_no_conclusion(report):
    _, text = report
    text = html.unescape(text)
    for conclusion in ("give lower rank", "gives lower rank", "the rank does not fall", "keeps SGD moving"):
        assert conclusion not in text


def test_metrics_are_flat_numbers_and_verdicts():
    result = {"claims": [{"id": "C1", "statement": "s", "rule": "r", "verdict": "holds", "n_runs": 3,
                          "mean_spearman_in_claimed_direction": 0.8, "groups": [{"x": 1}], "seeds": [0],
                          "lambda0": {"verdict": "fails", "min_final_over_initial": 0.5, "n_runs": 2},
                          "median_ratio": None, "flat": True}],
              "runs": {"available": 3, "judged": 3, "diverged": 0, "missing": 0}}
    assert claims.metrics(result) == {
        "C1.verdict": "holds", "C1.n_runs": 3, "C1.mean_spearman_in_claimed_direction": 0.8,
        "C1.lambda0.verdict": "fails", "C1.lambda0.min_final_over_initial": 0.5, "C1.lambda0.n_runs": 2,
        "runs.available": 3, "runs.judged": 3, "runs.diverged": 0, "runs.missing": 0}
