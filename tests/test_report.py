"""Snakemake's report of the tiny pipeline, made by the real `snakemake --report`: the
claims table as a page of its own, the figures under their names with what this run
measured for the claims each shows, and captions that state no conclusion."""
from __future__ import annotations

import html
import json
import re

import pytest
from conftest import TEST_CONFIG, snakemake

from rankbias.analysis import claims
from rankbias.plan import sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tiny_pipeline, tmp_path_factory):
    wd, _ = tiny_pipeline
    out = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(wd, "--configfile", TEST_CONFIG, "--report", str(out))
    return wd, out.read_text()


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
