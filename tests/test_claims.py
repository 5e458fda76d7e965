"""Claims C1-C7 on fabricated runs: every verdict reachable, diverged runs excluded,
intervals across seeds against hand-computed cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fabricate import fabricate
from rankbias.analysis import claims as C
from rankbias.store.results import load_runs
from rankbias.core.spec import NORMALISATIONS, RunSpec


def spec(**kw):
    base = dict(dataset="mnist", arch="mlp_bn", depth=3, width=20, batch_size=32, lr=0.1,
                weight_decay=5e-4, epochs=8, train_subset=1000, test_subset=200)
    base.update(kw)
    return RunSpec(**base)


def verdicts(tmp_path, **kw):
    res = C.judge(load_runs(tmp_path), **kw)
    return {c["id"]: c for c in res["claims"]}, res


def test_spearman_matches_pearson_of_ranks_and_handles_ties():
    x = [1, 2, 3, 4, 5]
    assert C.spearman(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert C.spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    y = [1.0, 3.0, 2.0, 2.0, 5.0]
    ry = C.rankdata(y)
    assert list(ry) == [1.0, 5.0, 2.5, 2.5, 4.0] or list(ry) == [1.0, 4.0, 2.5, 2.5, 5.0]
    assert C.spearman(x, y) == pytest.approx(np.corrcoef(C.rankdata(x), C.rankdata(y))[0, 1])
    assert np.isnan(C.spearman(x, [3, 3, 3, 3, 3]))


def test_nothing_is_insufficient(tmp_path):
    v, res = verdicts(tmp_path)
    assert {c["verdict"] for c in v.values()} == {"insufficient"}
    assert [c["id"] for c in res["claims"]] == [f"C{i}" for i in range(1, 8)] + ["T1", "T2", "T3", "R1", "R2", "R3"]


SEEDS = (0, 1, 2)


@pytest.mark.parametrize("level, df, expected", [
    # two-sided critical values of Student's t, from printed tables
    (0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 3, 3.1824), (0.95, 4, 2.7764),
    (0.95, 9, 2.2622), (0.95, 30, 2.0423), (0.90, 2, 2.9200), (0.99, 5, 4.0321),
    (0.99, 1, 63.6567), (0.95, 5000, 1.9604)])
def test_t_quantile_matches_the_tables(level, df, expected):
    assert C.t_quantile(level, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="df must be an integer >= 1, got 0"):
        C.t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="level must lie in"):
        C.t_quantile(1.0, 3)


def test_t_interval_by_hand_and_its_coverage_at_three_seeds():
    # [1, 0.5, 0.5]: mean 2/3, s = 0.2887, half width 4.3027 * 0.2887 / sqrt(3) = 0.7172
    lo, hi = C.t_interval([1.0, 0.5, 0.5], 0.95)
    assert (lo, hi) == pytest.approx((2 / 3 - 0.71716, 2 / 3 + 0.71716), abs=1e-4)
    assert C.t_interval([0.3, 0.3, 0.3], 0.95) == (pytest.approx(0.3), pytest.approx(0.3))
    # The interval means what it says at n = 3: 95% of normal samples' intervals cover the mean
    # (the percentile bootstrap of three values covers about 75%).
    x = np.random.default_rng(0).normal(1.0, 2.0, (20000, 3))
    half = C.t_quantile(0.95, 2) * x.std(axis=1, ddof=1) / np.sqrt(3)
    assert C.t_interval(x[0], 0.95) == pytest.approx((x[0].mean() - half[0], x[0].mean() + half[0]))
    covered = np.abs(x.mean(axis=1) - 1.0) <= half
    assert covered.mean() == pytest.approx(0.95, abs=0.006)


def test_across_seeds_averages_per_seed_and_needs_min_seeds():
    t = C.thresholds({})
    e = C.across_seeds([(0, 1.0), (0, 0.5), (1, 0.0), (1, 0.5), (2, 0.25)], t)
    assert e.per_seed == {0: 0.75, 1: 0.25, 2: 0.25} and e.to_dict()["over"] == "seeds"
    assert e.values == [0.75, 0.25, 0.25] and e.mean == pytest.approx(5 / 12)
    assert e.ci == pytest.approx(C.t_interval([0.75, 0.25, 0.25], 0.95))
    # Two seeds, however many groups: no interval, and the text names the seeds there are.
    two = C.across_seeds([(3, 1.0), (3, 0.5), (3, 0.0), (5, 0.5)], t)
    assert two.ci is None and two.to_dict()["ci"] is None and two.seeds == [3, 5]
    assert C.interval_text(two.to_dict()) == "0.5 from 2 seeds (3, 5): fewer than 3 seeds, no interval"
    assert C.across_seeds([(3, 1.0), (5, 0.5)], C.thresholds({"min_seeds": 2})).ci is not None
    with pytest.raises(ValueError, match="claims.min_seeds: expected an integer >= 2"):
        C.thresholds({"min_seeds": 1})
    with pytest.raises(ValueError, match="unknown threshold.*'bootstrap_resamples'"):
        C.thresholds({"bootstrap_resamples": 100})



def test_a_correlations_interval_stays_within_minus_one_and_one():
    """Per-seed Spearman 0.9, 0.95, 0.99: the plain t interval reaches past 1; cut to the
    values a correlation can take it ends at 1, its lower end unchanged."""
    t = C.thresholds({})
    plain = C.t_interval([0.9, 0.95, 0.99], 0.95)
    assert plain[1] > 1
    e = C.across_seeds([(0, 0.9), (1, 0.95), (2, 0.99)], t, bounds=(-1.0, 1.0))
    assert e.ci == pytest.approx((plain[0], 1.0))
    low = C.across_seeds([(0, -0.9), (1, -0.95), (2, -0.99)], t, bounds=(-1.0, 1.0))
    assert low.ci == pytest.approx((-1.0, -plain[0]))
    # a fraction (C6) is cut to [0, 1]
    frac = C.across_seeds([(0, 1.0), (1, 1.0), (2, 0.5)], t, bounds=(0.0, 1.0))
    assert frac.ci[1] == 1.0 and frac.ci[0] == pytest.approx(C.t_interval([1.0, 1.0, 0.5], 0.95)[0])
    # unbounded effects keep the whole interval
    assert C.across_seeds([(0, 0.9), (1, 0.95), (2, 0.99)], t).ci == pytest.approx(plain)


def test_c1_holds_across_seeds_fails_when_a_seed_contradicts(tmp_path):
    for seed in SEEDS:
        for b, r in ((8, 6), (32, 12), (128, 19)):
            fabricate(tmp_path, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
    v, _ = verdicts(tmp_path)
    sp = v["C1"]["spearman_in_claimed_direction"]
    assert v["C1"]["verdict"] == "holds"
    assert sp["per_seed"] == {"0": 1.0, "1": 1.0, "2": 1.0} and sp["over"] == "seeds"
    assert sp["mean"] == pytest.approx(1.0) and sp["ci"] == pytest.approx([1.0, 1.0])
    assert sp["method"] == "Student t"
    assert v["C1"]["intervals"]["Spearman"] == sp
    assert v["C1"]["n_runs"] == 9 and v["C1"]["seeds"] == [0, 1, 2]
    # A fourth seed with the opposite trend puts no effect inside the interval.
    for b, r in ((8, 19), (32, 12), (128, 6)):
        fabricate(tmp_path, spec(batch_size=b, seed=3), final_ranks=[r] * 3)
    v, _ = verdicts(tmp_path)
    assert v["C1"]["verdict"] == "fails" and v["C1"]["n_contradicting"] == 1
    assert v["C1"]["spearman_in_claimed_direction"]["ci"][0] < 0


def test_c1_fewer_than_three_seeds_is_insufficient_naming_them(tmp_path):
    # Two seeds, two groups each, every group with the claimed trend: still no interval.
    for seed in (4, 7):
        for lr in (0.05, 0.1):
            for b, r in ((8, 6), (32, 12), (128, 19)):
                fabricate(tmp_path, spec(batch_size=b, lr=lr, seed=seed), final_ranks=[r] * 3)
    v, res = verdicts(tmp_path)
    sp = v["C1"]["spearman_in_claimed_direction"]
    assert v["C1"]["verdict"] == "insufficient" and sp["n_values"] == 2 and sp["ci"] is None
    assert "Spearman: 1 from 2 seeds (4, 7): fewer than 3 seeds, no interval" in C.markdown(res)
    for b, r in ((8, 5), (32, 9), (128, 18)):
        fabricate(tmp_path, spec(batch_size=b, seed=9), final_ranks=[r] * 3)
    v, _ = verdicts(tmp_path)
    assert v["C1"]["verdict"] == "holds" and v["C1"]["seeds"] == [4, 7, 9]


def test_c1_fails_when_three_positive_seeds_spread_too_widely(tmp_path):
    # Per-seed Spearman 1, 0.5, 0.5: every seed shows the trend and the range [0.5, 1] (what a
    # percentile bootstrap gives) lies above 0, but the t interval 0.667 +- 0.717 does not
    # (cut at 1, the largest value a correlation takes).
    for seed, ranks in ((0, (6, 12, 19)), (1, (12, 6, 19)), (2, (12, 6, 19))):
        for b, r in zip((8, 32, 128), ranks):
            fabricate(tmp_path, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
    v, _ = verdicts(tmp_path)
    sp = v["C1"]["spearman_in_claimed_direction"]
    assert sp["per_seed"] == {"0": 1.0, "1": 0.5, "2": 0.5}
    assert sp["ci"] == pytest.approx([2 / 3 - 0.7172, 1.0], abs=1e-3)
    assert v["C1"]["verdict"] == "fails"
    # With a 75% interval (t = 1.6036 at df 2) the same seeds suffice.
    assert verdicts(tmp_path, overrides={"ci_level": 0.75})[0]["C1"]["verdict"] == "holds"


def test_c1_insufficient_with_two_batch_sizes_or_diverged(tmp_path):
    fabricate(tmp_path, spec(batch_size=8), final_ranks=[6] * 3)
    fabricate(tmp_path, spec(batch_size=32), final_ranks=[12] * 3)
    fabricate(tmp_path, spec(batch_size=128), final_ranks=[2] * 3, diverged_at=4)
    v, res = verdicts(tmp_path)
    assert v["C1"]["verdict"] == "insufficient"
    assert res["runs"]["diverged"] == 1 and res["diverged_runs"][0]["epoch"] == 4


def test_c1_flat_groups_fail(tmp_path):
    for seed in SEEDS:
        for b in (8, 32, 128):
            fabricate(tmp_path, spec(batch_size=b, seed=seed), final_ranks=[20] * 3)
    v, _ = verdicts(tmp_path)
    assert v["C1"]["verdict"] == "fails" and v["C1"]["n_flat"] == 3
    assert v["C1"]["spearman_in_claimed_direction"]["ci"] == [0.0, 0.0]


def test_c2(tmp_path):
    for seed in SEEDS:
        fabricate(tmp_path, spec(lr=0.01, seed=seed), final_ranks=[18] * 3)
        fabricate(tmp_path, spec(lr=0.1, seed=seed), final_ranks=[8] * 3)
    assert verdicts(tmp_path)[0]["C2"]["verdict"] == "holds"
    fabricate(tmp_path, spec(lr=0.01, seed=3), final_ranks=[8] * 3)
    fabricate(tmp_path, spec(lr=0.1, seed=3), final_ranks=[18] * 3)
    assert verdicts(tmp_path)[0]["C2"]["verdict"] == "fails"


def test_c3_needs_both_trend_and_no_reduction_at_zero(tmp_path):
    for seed in SEEDS:
        fabricate(tmp_path, spec(weight_decay=5e-4, seed=seed), final_ranks=[14] * 3)
        fabricate(tmp_path, spec(weight_decay=5e-3, seed=seed), final_ranks=[6] * 3)
    assert verdicts(tmp_path)[0]["C3"]["verdict"] == "insufficient"
    for seed in SEEDS:
        fabricate(tmp_path, spec(weight_decay=0.0, seed=seed), final_ranks=[20] * 3)
    v, _ = verdicts(tmp_path)
    assert v["C3"]["verdict"] == "holds"
    assert v["C3"]["lambda0"]["min_final_over_initial"] == pytest.approx(1.0)
    assert v["C3"]["lambda0"]["rank_reduction"]["ci"] == pytest.approx([0.0, 0.0])


def test_c3_fails_when_lambda0_reduces_rank(tmp_path):
    for seed in SEEDS:
        fabricate(tmp_path, spec(weight_decay=0.0, seed=seed), final_ranks=[15] * 3)
        fabricate(tmp_path, spec(weight_decay=5e-4, seed=seed), final_ranks=[10] * 3)
        fabricate(tmp_path, spec(weight_decay=5e-3, seed=seed), final_ranks=[5] * 3)
    v, _ = verdicts(tmp_path)
    assert v["C3"]["trend_verdict"] == "holds"
    assert v["C3"]["lambda0"]["verdict"] == "fails" and v["C3"]["verdict"] == "fails"


def _decaying(e, start=0.1, rate=0.6):
    return [start * rate ** k for k in range(e)]


def _c4_pair(tmp_path, d0, d, seeds=SEEDS, E=8):
    for seed in seeds:
        fabricate(tmp_path, spec(weight_decay=0.0, epochs=E, seed=seed), distance=d0)
        fabricate(tmp_path, spec(weight_decay=5e-4, epochs=E, seed=seed), distance=d)


def test_c4_ratio_and_persistence(tmp_path):
    E = 8
    _c4_pair(tmp_path, _decaying(E), [0.2] * E)
    v, _ = verdicts(tmp_path)
    c4 = v["C4"]
    late0 = np.mean(_decaying(E)[6:])      # epochs 7, 8 (last quarter of 8)
    assert c4["pairs"][0]["d_late_lambda0"] == pytest.approx(late0, rel=1e-3)
    assert c4["median_ratio"] == pytest.approx(0.2 / late0, rel=1e-3)
    assert c4["log10_ratio"]["mean"] == pytest.approx(np.log10(0.2 / late0), abs=1e-3)
    assert c4["log10_ratio"]["per_seed"].keys() == {"0", "1", "2"}
    assert c4["verdict"] == "holds"


def test_c4_fails_when_distances_equal_or_decay(tmp_path):
    E = 8
    _c4_pair(tmp_path, [0.1] * E, [0.12] * E)
    assert verdicts(tmp_path)[0]["C4"]["verdict"] == "fails"


def test_c4_fails_when_lambda_run_converges(tmp_path):
    E = 8
    _c4_pair(tmp_path, _decaying(E, 0.01, 0.5), _decaying(E, 1.0, 0.5))
    v, _ = verdicts(tmp_path)
    assert v["C4"]["median_ratio"] > 2 and v["C4"]["verdict"] == "fails"


def _c5_runs(tmp_path, low_test_end, seeds=SEEDS):
    for seed in seeds:
        fabricate(tmp_path, spec(batch_size=8, seed=seed), final_ranks=[3] * 3,
                  train_acc=np.linspace(0.1, 0.8, 9), test_acc=np.linspace(0.1, low_test_end, 9))
        fabricate(tmp_path, spec(batch_size=128, seed=seed), final_ranks=[20] * 3,
                  train_acc=np.linspace(0.1, 0.99, 9), test_acc=np.linspace(0.1, 0.9, 9))


def test_c5_judges_the_generalisation_gap(tmp_path):
    # Very low rank: train 0.80, test 0.71 (gap 0.09); high rank: train 0.99, test 0.90 (gap 0.09).
    # Test accuracy alone drops by 0.19, yet the gaps are equal: a marginal effect on generalisation.
    _c5_runs(tmp_path, 0.71)
    v, _ = verdicts(tmp_path)
    c5 = v["C5"]
    assert c5["verdict"] == "holds" and c5["hurts_training"] == "holds"
    g = c5["groups"][0]
    assert g["gap_low"] == pytest.approx(0.09) and g["gap_high"] == pytest.approx(0.09)
    assert g["train_acc_drop"] == pytest.approx(0.19) and g["test_acc_gain"] == pytest.approx(-0.19)
    assert c5["gap_difference"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert c5["train_acc_drop"]["ci"] == pytest.approx([0.19, 0.19])


def test_c5_fails_when_the_gaps_differ(tmp_path):
    # Very low rank: train 0.80, test 0.78 (gap 0.02) against a gap of 0.09: not marginal.
    _c5_runs(tmp_path, 0.78)
    v, _ = verdicts(tmp_path)
    assert v["C5"]["gap_difference"]["mean"] == pytest.approx(-0.07)
    assert v["C5"]["marginal_generalisation"] == "fails" and v["C5"]["verdict"] == "fails"
    assert verdicts(tmp_path, overrides={"c5_gap_margin": 0.08})[0]["C5"]["verdict"] == "holds"


def test_c6_parts(tmp_path):
    for seed in SEEDS:
        fabricate(tmp_path, spec(depth=5, seed=seed), final_ranks=[18, 9, 4, 10, 16])
    v, _ = verdicts(tmp_path)
    assert v["C6"]["mlp"]["verdict"] == "holds" and v["C6"]["verdict"] == "insufficient"
    for seed in SEEDS:
        fabricate(tmp_path, spec(arch="res", depth=2, seed=seed), final_ranks=[18, 10, 10, 9, 11])
    v, _ = verdicts(tmp_path)
    assert v["C6"]["resnet"]["fraction_balanced"] == 1.0 and v["C6"]["verdict"] == "holds"
    for seed in (3, 4, 5, 6, 7, 8):
        fabricate(tmp_path, spec(depth=5, seed=seed), final_ranks=[18, 14, 10, 6, 2])
    v, _ = verdicts(tmp_path)
    assert v["C6"]["mlp"]["fraction_bottleneck"] == pytest.approx(1 / 3, abs=1e-3)
    assert v["C6"]["mlp"]["fraction"]["per_seed"]["3"] == 0.0 and v["C6"]["verdict"] == "fails"


def test_c7(tmp_path):
    for seed in SEEDS:
        fabricate(tmp_path, spec(batch_size=1000, seed=seed), final_ranks=[20] * 3)
    v, _ = verdicts(tmp_path)
    assert v["C7"]["verdict"] == "holds" and v["C7"]["rank_reduction"]["ci"] == pytest.approx([0, 0])
    fabricate(tmp_path, spec(batch_size=1000, seed=3), final_ranks=[5] * 3)
    assert verdicts(tmp_path)[0]["C7"]["verdict"] == "fails"


def test_c7_tiny_data_is_exempt(tmp_path):
    fabricate(tmp_path, spec(batch_size=100, train_subset=100), final_ranks=[5] * 3)
    v, _ = verdicts(tmp_path)
    assert v["C7"]["verdict"] == "insufficient" and v["C7"]["n_tiny_data_runs"] == 1


def test_rank_tolerance_is_applied(tmp_path):
    # Singular values 1e-7 are above tol 1e-9: every matrix is full rank, C1 is flat.
    for seed in SEEDS:
        for b, r in ((8, 6), (32, 12), (128, 19)):
            fabricate(tmp_path, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
    assert verdicts(tmp_path)[0]["C1"]["verdict"] == "holds"
    assert verdicts(tmp_path, tol=1e-9)[0]["C1"]["verdict"] == "fails"


def test_unknown_threshold_is_named(tmp_path):
    with pytest.raises(ValueError, match="c9_bogus"):
        C.judge([], overrides={"c9_bogus": 1})


def test_cli_writes_md_and_json(tmp_path):
    from rankbias.cli import main
    runs = tmp_path / "runs"
    for seed in SEEDS:
        for b, r in ((8, 6), (32, 12), (128, 19)):
            fabricate(runs, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
    assert main(["claims", "--runs", str(runs), "--out", str(tmp_path / "claims")]) == 0
    doc = json.loads((tmp_path / "claims.json").read_text())
    assert [c["id"] for c in doc["claims"]] == [f"C{i}" for i in range(1, 8)] + ["T1", "T2", "T3", "R1", "R2", "R3"]
    assert doc["claims"][0]["verdict"] == "holds"
    md = (tmp_path / "claims.md").read_text()
    assert "| C1 |" in md and "**holds**" in md and "Spearman: 1 [1, 1] (3 seeds)" in md
    assert "3: 0, 1, 2 |" in md


def test_cli_writes_each_output_at_the_path_given(tmp_path, capsys):
    """The workflow names every declared output (--md, --json, --html, --metrics,
    --provenance); the stem --out then names nothing, and the set is what --out writes."""
    from rankbias.cli import main
    runs = tmp_path / "runs"
    for seed in SEEDS:
        for b, r in ((8, 6), (32, 12), (128, 19)):
            fabricate(runs, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
    assert main(["claims", "--runs", str(runs), "--out", str(tmp_path / "stem")]) == 0
    given = {"md": tmp_path / "t" / "verdicts.md", "json": tmp_path / "t" / "verdicts.json",
             "html": tmp_path / "h" / "table.html", "metrics": tmp_path / "m.json",
             "provenance": tmp_path / "t" / "verdicts.provenance.json"}
    args = [a for k, v in given.items() for a in (f"--{k}", str(v))]
    assert main(["claims", "--runs", str(runs), "--out", str(tmp_path / "unused"), *args]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("unused")) == []
    for kind, path in given.items():
        suffix = C.SUFFIXES[kind]
        stem = (tmp_path / f"stem{suffix}").read_bytes()
        if kind == "provenance":     # it names its table and JSON, by their own names
            assert json.loads(path.read_text())["outputs"].keys() == {"verdicts.md", "verdicts.json"}
        else:
            assert path.read_bytes() == stem, kind
    assert str(given["md"]) in capsys.readouterr().out


@pytest.mark.parametrize("bad, expected", [
    (["--provenance", "elsewhere/claims.provenance.json"], "expected {md_dir}/claims.provenance.json"),
    (["--json", "other/claims.json"], "--json other/claims.json: expected in the folder of --md"),
])
def test_cli_refuses_outputs_the_provenance_record_cannot_name(tmp_path, capsys, bad, expected):
    from rankbias.cli import main
    runs = tmp_path / "runs"
    fabricate(runs, spec(batch_size=8, seed=0), final_ranks=[6] * 3)
    md_dir = tmp_path / "t"
    assert main(["claims", "--runs", str(runs), "--md", str(md_dir / "claims.md"), *bad]) == 1
    err = capsys.readouterr().err
    assert expected.format(md_dir=md_dir) in err, err
    assert not md_dir.exists()


def test_table_prints_a_row_per_claim_and_names_a_bad_file(tmp_path, capsys):
    from rankbias.cli import main
    runs = tmp_path / "runs"
    for seed in SEEDS:
        for b, r in ((8, 6), (32, 12), (128, 19)):
            fabricate(runs, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
    assert main(["claims", "--runs", str(runs), "--out", str(tmp_path / "claims")]) == 0
    capsys.readouterr()
    assert main(["claims", "--out", str(tmp_path / "claims"), "--table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["id", "verdict", "runs", "seeds"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert list(rows) == [f"C{i}" for i in range(1, 8)] + ["T1", "T2", "T3", "R1", "R2", "R3"]
    assert rows["C1"].split()[1] == "holds" and "Spearman: 1 [1, 1] (3 seeds)" in rows["C1"]
    assert lines[-1].startswith("runs: available 9")
    assert max(len(line) for line in lines) < 240      # dvc metrics show: one row of ~1,900
    bad = tmp_path / "bad.json"
    bad.write_text('{"claims": 3}')
    assert main(["claims", "--table", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "'claims' is a list" in err
    assert main(["claims", "--table", str(tmp_path / "none.json")]) == 1
    assert "none.json: no such file" in capsys.readouterr().err


def test_c4_verdict_uses_unrounded_ratios(tmp_path):
    # Ratio 1.0004 rounds to 1.0 for display, but it is > 1 and meets c4_min_ratio = 1.
    E = 8
    _c4_pair(tmp_path, [0.1] * E, [0.10004] * E)
    v, _ = verdicts(tmp_path, overrides={"c4_min_ratio": 1.0})
    assert v["C4"]["pairs"][0]["ratio"] == pytest.approx(1.0)
    assert v["C4"]["verdict"] == "holds"


def test_c4_holds_when_lambda0_run_stops_moving(tmp_path):
    E = 8
    _c4_pair(tmp_path, [0.1] * 4 + [0.0] * 4, [0.2] * E)
    v, _ = verdicts(tmp_path)
    assert v["C4"]["pairs"][0]["d_late_lambda0"] == 0.0
    assert v["C4"]["pairs"][0]["log10_ratio"] == C.C4_MAX_LOG10
    assert v["C4"]["verdict"] == "holds" and v["C4"]["n_runs"] == 6


def test_c4_insufficient_without_lambda0_distance(tmp_path):
    E = 8
    fabricate(tmp_path, spec(weight_decay=0.0, epochs=E), distance=[float("nan")] * E)
    fabricate(tmp_path, spec(weight_decay=5e-4, epochs=E), distance=[0.2] * E)
    v, _ = verdicts(tmp_path)
    assert v["C4"]["verdict"] == "insufficient"
    assert v["C4"]["pairs"] == [] and v["C4"]["n_runs"] == 0 and v["C4"]["n_unusable_pairs"] == 1
    # A usable pair of another seed is judged on its own.
    _c4_pair(tmp_path, _decaying(E), [0.2] * E, seeds=(1, 2, 3))
    v, _ = verdicts(tmp_path)
    assert v["C4"]["verdict"] == "holds" and v["C4"]["n_runs"] == 6 and v["C4"]["seeds"] == [1, 2, 3]


def test_claims_refuse_a_run_that_fails_verification_and_record_provenance(tmp_path):
    from rankbias.cli import main
    runs = tmp_path / "runs"
    paths = [fabricate(runs, spec(batch_size=b), final_ranks=[r] * 3) for b, r in ((8, 6), (32, 12))]
    assert main(["claims", "--runs", str(runs), "--out", str(tmp_path / "claims")]) == 0
    record = json.loads((tmp_path / "claims.provenance.json").read_text())
    assert sorted(r["run_id"] for r in record["runs"]) == sorted(p.name for p in paths)
    info = json.loads((paths[0] / "run.json").read_text())
    info["diverged"] = {"epoch": 1, "reason": "injected"}
    (paths[0] / "run.json").write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match=f"claims: refusing 1 run.* {paths[0].name} .*edited"):
        C.run_claims(None, runs, tmp_path / "again")
    f = paths[1] / "spectra.npz"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(RuntimeError, match=f"refusing 2 run.*{paths[1].name} .*spectra.npz: sha256"):
        C.run_claims(None, runs, tmp_path / "again")
    assert not (tmp_path / "again.md").exists()


# -- rank settings across their whole accepted range ---------------------------------------

@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory):
    """Runs for C1, C3 (weight decay 0) and C7 (full batch), three seeds."""
    d = tmp_path_factory.mktemp("mixed")
    for seed in SEEDS:
        for b, r in ((8, 6), (32, 12), (128, 19)):
            fabricate(d, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
        fabricate(d, spec(weight_decay=0.0, seed=seed), final_ranks=[18] * 3)
        fabricate(d, spec(batch_size=1000, seed=seed), final_ranks=[19] * 3)
    return load_runs(d)


@settings(max_examples=40, deadline=None)
@given(tol=st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False),
       normalise=st.sampled_from(NORMALISATIONS))
@example(tol=0.5, normalise="fro")           # every rank 0 from the first epoch on
@example(tol=5e-324, normalise="none")
@example(tol=1.0, normalise="max")
@example(tol=1.7976931348623157e308, normalise="fro")
def test_every_accepted_rank_setting_gives_verdicts_not_a_crash(mixed_runs, tol, normalise):
    res = C.judge(mixed_runs, normalise, tol)
    C.markdown(res), C.html(res), C.metrics(res)
    json.dumps(res, allow_nan=False)
    for c in res["claims"]:
        assert c["verdict"] in ("holds", "fails", "insufficient"), c["id"]
        for name, e in c.get("intervals", {}).items():
            assert e["n_values"] == 0 or e["mean"] is not None, (c["id"], name, e)
    measured = [r for r in mixed_runs if C.summarise(r, normalise, tol).initial_rank > 0]
    assert res["runs"]["unmeasured"] == len(mixed_runs) - len(measured)
    if not measured:
        assert {c["verdict"] for c in res["claims"] if c["id"].startswith("C")} == {"insufficient"}


def test_a_tolerance_above_every_singular_value_is_insufficient(mixed_runs):
    res = C.judge(mixed_runs, "fro", 0.5)
    assert res["runs"]["unmeasured"] == len(mixed_runs) and res["runs"]["judged"] == 0
    assert {c["verdict"] for c in res["claims"] if c["id"].startswith("C")} == {"insufficient"}
    assert "15 with no singular value above tol 0.5 at epoch 0" in C.markdown(res)


def _claims_files(stem):
    return {p.name: p.read_bytes() for p in stem.parent.iterdir() if p.name.startswith(stem.name)}


@pytest.mark.parametrize("breaks", ["html", "figure_provenance"])
def test_the_claims_outputs_are_replaced_all_or_none(tmp_path, monkeypatch, breaks):
    from rankbias.store import provenance
    runs = tmp_path / "runs"
    for b, r in ((8, 6), (32, 12), (128, 19)):
        fabricate(runs, spec(batch_size=b), final_ranks=[r] * 3)
    out = tmp_path / "out" / "claims"
    C.run_claims(None, runs, out)
    before = _claims_files(out)
    assert sorted(before) == ["claims.html", "claims.json", "claims.md", "claims.metrics.json",
                              "claims.provenance.json"]
    fabricate(runs, spec(batch_size=512), final_ranks=[19] * 3)   # the next table differs

    def broken(*args, **kwargs):
        raise RuntimeError(f"{breaks} failed")

    monkeypatch.setattr(C if breaks == "html" else provenance, breaks, broken)
    with pytest.raises(RuntimeError, match=f"{breaks} failed"):
        C.run_claims(None, runs, out)
    assert _claims_files(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(before)   # no temporary left
    monkeypatch.undo()
    C.run_claims(None, runs, out)
    after = _claims_files(out)
    assert sorted(after) == sorted(before) and all(after[k] != before[k] for k in after)


# -- checks beyond the paper: R1 (rank floor) and R2 (GD with weight decay at stationarity)

def test_r1_rank_floor_holds_when_the_strongest_bias_keeps_k_minus_one(tmp_path):
    for seed in (0, 1, 2):
        fabricate(tmp_path, spec(seed=seed), final_ranks=[15, 10, 12])          # strongest: floor 9 kept
        fabricate(tmp_path, spec(seed=seed, batch_size=128), final_ranks=[20] * 3)
        fabricate(tmp_path, spec(seed=seed, weight_decay=0.0), final_ranks=[2] * 3)  # no weight decay: not judged
    v, res = verdicts(tmp_path)
    r1 = v["R1"]
    assert r1["verdict"] == "holds" and r1["floor"] == 9 and r1["n_runs"] == 3 and r1["n_below_floor"] == 0
    assert r1["shortfall"]["ci"] == pytest.approx([0, 0])
    assert {x["lowest_layer_rank"] for x in r1["runs"]} == {10.0}
    assert r1["beyond_paper"] is True and "2402.03991" in r1["source"]
    assert "Check beyond the paper: Zangrando et al." in C.markdown(res)


def test_r1_rank_floor_fails_when_one_strongest_run_falls_below(tmp_path):
    for seed in (0, 1, 2):
        fabricate(tmp_path, spec(seed=seed), final_ranks=[15, 10 if seed else 8, 12])
        fabricate(tmp_path, spec(seed=seed, batch_size=128), final_ranks=[20] * 3)
    r1 = verdicts(tmp_path)[0]["R1"]
    assert r1["verdict"] == "fails" and r1["n_below_floor"] == 1
    assert r1["shortfall"]["per_seed"] == {"0": -1.0, "1": 0.0, "2": 0.0}


def test_r1_rank_floor_fails_when_a_hidden_matrix_falls_below(tmp_path):
    for seed in (0, 1, 2):
        fabricate(tmp_path, spec(seed=seed), final_ranks=[15, 4, 12])
        fabricate(tmp_path, spec(seed=seed, batch_size=128), final_ranks=[20] * 3)
    r1 = verdicts(tmp_path)[0]["R1"]
    assert r1["verdict"] == "fails" and r1["n_below_floor"] == 3
    assert r1["shortfall"]["mean"] == pytest.approx(-5.0)
    assert len({x["lowest_layer"] for x in r1["runs"]}) == 1      # the middle matrix, in every run


def _full_batch(**kw):
    return spec(**{"batch_size": 500, "train_subset": 500, "weight_decay": 5e-2, **kw})


def test_r2_holds_when_the_rank_falls_at_stationarity(tmp_path):
    for seed in (0, 1, 2):
        # d flat at 1e-2 over the last tenths: flattened, so stationary
        fabricate(tmp_path, _full_batch(seed=seed), final_ranks=[5] * 3, distance=[0.1] * 4 + [0.01] * 4)
    # still falling fast: not stationary, counted and left out
    fabricate(tmp_path, _full_batch(seed=3), final_ranks=[20] * 3, distance=[0.1] * 6 + [0.05, 0.01])
    v, res = verdicts(tmp_path)
    r2 = v["R2"]
    assert r2["verdict"] == "holds" and r2["n_runs"] == 3 and r2["n_not_stationary"] == 1
    assert r2["rank_reduction"]["mean"] == pytest.approx(0.75)
    assert r2["beyond_paper"] is True and "2502.17340" in r2["source"]
    assert v["C7"]["verdict"] == "insufficient"      # 500 examples: tiny data for C7


def test_r2_fails_when_the_rank_stays_at_stationarity(tmp_path):
    for seed in (0, 1, 2):
        # d down to 1e-6: at rest
        fabricate(tmp_path, _full_batch(seed=seed), final_ranks=[20] * 3,
                  distance=[0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6, 1e-6, 1e-6])
    r2 = verdicts(tmp_path)[0]["R2"]
    assert r2["verdict"] == "fails" and r2["n_runs"] == 3
    assert r2["rank_reduction"]["ci"] == pytest.approx([0, 0])


def test_r2_without_a_stationary_run_is_insufficient(tmp_path):
    for seed in (0, 1):
        fabricate(tmp_path, _full_batch(seed=seed), final_ranks=[5] * 3, distance=[0.1] * 6 + [0.05, 0.01])
        # flat at lr x lambda / (1 - momentum) = 0.05: weight decay alone, shrinking towards zero
        fabricate(tmp_path, _full_batch(seed=seed, train_subset=501, batch_size=501), final_ranks=[5] * 3,
                  distance=[0.05] * 8)
        fabricate(tmp_path, _full_batch(seed=seed, weight_decay=0.0), final_ranks=[5] * 3,
                  distance=[0.1] * 4 + [1e-6] * 4)       # weight decay 0: not R2's
    r2 = verdicts(tmp_path)[0]["R2"]
    assert r2["verdict"] == "insufficient" and r2["n_not_stationary"] == 4
    assert [x["decay_shrink"] for x in r2["runs"]] == pytest.approx([0.05] * 4)


# -- R3: label noise lowers the rank at weight decay 0

def _r3_runs(tmp_path, seeds, noisy_rank, clean_rank=20, noise=(0.3,)):
    for seed in seeds:
        fabricate(tmp_path, spec(seed=seed, weight_decay=0.0), final_ranks=[clean_rank] * 3)
        for p in noise:
            fabricate(tmp_path, spec(seed=seed, weight_decay=0.0, label_noise=p),
                      final_ranks=[noisy_rank(seed)] * 3)


def test_r3_holds_when_label_noise_lowers_the_rank_at_weight_decay_0(tmp_path):
    _r3_runs(tmp_path, SEEDS, lambda seed: 12 + seed, noise=(0.1, 0.3))
    v, res = verdicts(tmp_path)
    r3 = v["R3"]
    assert r3["verdict"] == "holds" and r3["n_runs"] == 9 and r3["seeds"] == [0, 1, 2]
    assert r3["label_noise"] == [0.1, 0.3] and len(r3["pairs"]) == 6
    # per seed: 1 - (12 + seed) / 20
    assert r3["rank_reduction_vs_clean"]["per_seed"] == {"0": 0.4, "1": 0.35, "2": 0.3}
    lo, hi = r3["rank_reduction_vs_clean"]["ci"]
    assert 0 < lo < 0.35 < hi
    assert r3["beyond_paper"] is True and "Varre" in r3["source"] and "NeurIPS 2024" in r3["source"]
    assert r3["setting"]["seeds"] == [0, 1, 2]
    md = C.markdown(res)
    assert "Check beyond the paper: Varre, Sagitova & Flammarion" in md and "### R3: holds" in md
    # the paper's claims judge the runs on the true labels only: C3's lambda = 0 part
    # sees the three clean runs (no rank reduction), not the noisy ones
    assert v["C3"]["lambda0"]["n_runs"] == 3 and v["C3"]["lambda0"]["verdict"] == "holds"


def test_r3_fails_when_label_noise_leaves_the_rank(tmp_path):
    _r3_runs(tmp_path, SEEDS, lambda seed: 20 - (seed == 1))
    r3 = verdicts(tmp_path)[0]["R3"]
    assert r3["verdict"] == "fails" and len(r3["pairs"]) == 3
    assert r3["rank_reduction_vs_clean"]["mean"] == pytest.approx(0.05 / 3, abs=1e-4)


def test_r3_with_two_seeds_or_weight_decay_is_insufficient(tmp_path):
    _r3_runs(tmp_path, (0, 2), lambda seed: 10)
    for seed in SEEDS:   # label noise with weight decay > 0: not R3's
        fabricate(tmp_path, spec(seed=seed), final_ranks=[20] * 3)
        fabricate(tmp_path, spec(seed=seed, label_noise=0.3), final_ranks=[10] * 3)
    v, res = verdicts(tmp_path)
    r3 = v["R3"]
    assert r3["verdict"] == "insufficient" and r3["seeds"] == [0, 2] and r3["n_runs"] == 4
    text = C.interval_text(r3["intervals"]["rank reduction vs p=0"])
    assert "from 2 seeds (0, 2): fewer than 3 seeds, no interval" in text
    assert C.claim_r3([], C.thresholds(None))["verdict"] == "insufficient"


# -- robustness to the rank convention

def _c1_runs(tmp_path, tail):
    for seed in SEEDS:
        for b, r in ((8, 5), (32, 10), (128, 15)):
            fabricate(tmp_path, spec(seed=seed, batch_size=b), final_ranks=[r] * 3, tail=tail)


def test_conventions_agree_on_clean_spectra(tmp_path):
    _c1_runs(tmp_path, 1e-7)
    _, res = verdicts(tmp_path)
    rob = {c["id"]: c for c in res["robustness"]["claims"]}
    assert [c["measure"] for c in res["robustness"]["conventions"]] == ["threshold", "threshold",
                                                                         "effective", "stable"]
    assert set(rob) == {"C1", "C2", "C3", "R1", "R3"}
    assert {v["verdict"] for v in rob["C1"]["verdicts"].values()} == {"holds"} and rob["C1"]["agree"]
    md = C.markdown(res)
    assert "## Robustness to the rank convention" in md and "| C1 | **holds**" in md
    assert C.metrics(res)["robustness.C1.agree"] == "yes"


def test_conventions_disagree_when_the_tail_sits_between_the_thresholds(tmp_path):
    # Tail 2e-3: below tol 1e-3 x ||W||_F (>= sqrt(5)) but above tol x sigma_max = 1e-3. Under
    # the sigma_max threshold every matrix is full rank (every group flat, C1 fails); the paper's
    # threshold, the effective and the stable rank all see ranks 5, 10, 15.
    _c1_runs(tmp_path, 2e-3)
    _, res = verdicts(tmp_path)
    c1 = next(c for c in res["robustness"]["claims"] if c["id"] == "C1")
    by = {name: v["verdict"] for name, v in c1["verdicts"].items()}
    assert by == {"threshold on W/‖W‖_F (the paper's)": "holds", "threshold on W/σ_max": "fails",
                  "effective rank exp H(σ/Σσ)": "holds", "stable rank ‖W‖_F²/‖W‖₂²": "holds"}
    assert not c1["agree"] and "| **no** |" in C.markdown(res)
    # the config's convention decides the main table; nothing is retrained to change it
    v_max, res_max = verdicts(tmp_path, normalise="max")
    assert v_max["C1"]["verdict"] == "fails" and res_max["robustness"] == res["robustness"]
    v_eff, res_eff = verdicts(tmp_path, measure="effective")
    assert v_eff["C1"]["verdict"] == "holds" and res_eff["rank"]["measure"] == "effective"
    assert "Rank: measure=effective." in C.markdown(res_eff)


def _r3_tail_runs(tmp_path, tail):
    for seed in SEEDS:
        fabricate(tmp_path, spec(seed=seed, weight_decay=0.0), final_ranks=[15] * 3, tail=tail)
        fabricate(tmp_path, spec(seed=seed, weight_decay=0.0, label_noise=0.3),
                  final_ranks=[5 + seed] * 3, tail=tail)


def test_r3_conventions_agree_on_clean_spectra(tmp_path):
    _r3_tail_runs(tmp_path, 1e-7)
    v, res = verdicts(tmp_path)
    r3 = next(c for c in res["robustness"]["claims"] if c["id"] == "R3")
    assert v["R3"]["verdict"] == "holds"
    assert {x["verdict"] for x in r3["verdicts"].values()} == {"holds"} and r3["agree"]
    assert "| R3 | **holds**" in C.markdown(res) and C.metrics(res)["robustness.R3.agree"] == "yes"


def test_r3_conventions_disagree_when_the_tail_sits_between_the_thresholds(tmp_path):
    # As for C1 below: a tail of 2e-3 is full rank under the sigma_max threshold, so the
    # noisy runs end at the clean runs' rank there (no reduction, R3 fails); the paper's
    # threshold, the effective and the stable rank see 5-7 against 15.
    _r3_tail_runs(tmp_path, 2e-3)
    _, res = verdicts(tmp_path)
    r3 = next(c for c in res["robustness"]["claims"] if c["id"] == "R3")
    by = {name: v["verdict"] for name, v in r3["verdicts"].items()}
    assert by == {"threshold on W/‖W‖_F (the paper's)": "holds", "threshold on W/σ_max": "fails",
                  "effective rank exp H(σ/Σσ)": "holds", "stable rank ‖W‖_F²/‖W‖₂²": "holds"}
    assert not r3["agree"] and C.metrics(res)["robustness.R3.agree"] == "no"


def test_stable_and_effective_ranks_read_off_stored_spectra(tmp_path):
    fabricate(tmp_path, spec(), final_ranks=[4, 6, 8], tail=0.0)
    (run,) = load_runs(tmp_path)
    for measure in ("effective", "stable"):
        mean, final = run.hidden_ranks(measure=measure)
        assert list(final["rank"]) == pytest.approx([4.0, 6.0, 8.0])
        assert mean.iloc[0] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="measure"):
        run.hidden_ranks(measure="entropy")


def test_each_verdict_records_the_setting_it_rests_on(tmp_path):
    """claims.json has, per claim, the models, data, sizes, epochs and seeds of the runs it
    judged, and claims.md a 'Setting:' line under each claim's rule."""
    for seed in SEEDS:
        for b, r in ((8, 6), (32, 12), (128, 19)):
            fabricate(tmp_path, spec(batch_size=b, seed=seed), final_ranks=[r] * 3)
    v, res = verdicts(tmp_path)
    assert v["C1"]["setting"] == {"models": ["MLP-BN-3-20"], "datasets": ["mnist"], "train_sizes": [1000],
                                  "epochs": [8], "seeds": [0, 1, 2]}
    assert all("setting" in c for c in res["claims"])
    assert v["C7"]["setting"]["models"] == []                # no full-batch run: rests on nothing
    md = C.markdown(res)
    assert "Setting: MLP-BN-3-20 on mnist (1000 training examples), 8 epochs, seeds 0, 1, 2." in md
    assert "### C7: insufficient\n\nSetting: no runs." in md
