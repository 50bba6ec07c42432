"""Cohort analysis: paired pre/post change and pCR association recover known simulated effects."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tilscore.cli import main
from tilscore.cohort import (
    ASSOCIATION_COLUMNS,
    PAIRED_COLUMNS,
    load_cohort,
    logistic_fit,
    median_ci,
    paired_change,
    pcr_association,
    run_cohort,
    simulate_cohort,
)
from tilscore.errors import TilscoreError, TilscoreWarning


def _row(table: pd.DataFrame, compartment: str, metric: str = "pct_positive", **kw) -> pd.Series:
    sel = (table["compartment"] == compartment) & (table["metric"] == metric)
    for k, v in kw.items():
        sel &= table[k] == v
    assert sel.sum() == 1
    return table[sel].iloc[0]


def _values(df: pd.DataFrame, compartment: str, timepoint: str) -> np.ndarray:
    sel = (df["compartment"] == compartment) & (df["timepoint"] == timepoint)
    return df.loc[sel, "pct_positive"].to_numpy()


# ------------------------------------------------------------------------- known effects


def test_paired_change_recovers_6_to_20_percent_stromal_tils():
    df = simulate_cohort(150, seed=3, pre_median=6.0, post_median=20.0, spread=0.6)
    table = paired_change(df, metrics=["pct_positive"])
    assert list(table.columns) == list(PAIRED_COLUMNS)
    stromal = _row(table, "stromal")
    assert stromal["n_pairs"] == 150
    pre, post = _values(df, "stromal", "pre"), _values(df, "stromal", "post")
    assert stromal["pre_median"] == pytest.approx(np.median(pre))
    assert stromal["post_median"] == pytest.approx(np.median(post))
    lo, hi = median_ci(pre)
    assert lo <= 6.0 <= hi
    lo, hi = median_ci(post)
    assert lo <= 20.0 <= hi
    # the population median of the per-patient change, from the same model by Monte Carlo
    rng = np.random.default_rng(0)
    x = 6.0 * np.exp(0.6 * rng.standard_normal(200_000))
    y = x * (20.0 / 6.0) * np.exp(0.6 * rng.standard_normal(200_000))
    true_change = float(np.median(y - x))
    assert stromal["change_ci_low"] <= true_change <= stromal["change_ci_high"]
    assert stromal["p_value"] < 1e-10
    assert stromal["note"] == ""
    # the null compartment: no change, no significance
    null = _row(table, "intratumoral")
    assert null["change_ci_low"] <= 0.0 <= null["change_ci_high"]
    assert null["p_value"] > 0.05


def test_pcr_association_recovers_a_known_odds_ratio():
    df = simulate_cohort(400, seed=5, odds_ratio_per_10=2.0, spread=0.7)
    table = pcr_association(df, metrics=["pct_positive"], timepoints=["pre"])
    assert list(table.columns) == list(ASSOCIATION_COLUMNS)
    stromal = _row(table, "stromal", timepoint="pre")
    assert stromal["n"] == 400
    assert stromal["per"] == "10 percentage points"
    assert stromal["ci_low"] <= 2.0 <= stromal["ci_high"]
    assert stromal["ci_low"] > 1.0
    assert stromal["p_value"] < 0.05
    null = _row(table, "intratumoral", timepoint="pre")
    assert null["ci_low"] <= 1.0 <= null["ci_high"]


def test_odds_ratio_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    true_or, covered, runs = 1.8, 0, 200
    for _ in range(runs):
        x = rng.lognormal(math.log(15.0), 0.6, 120)
        p = 1 / (1 + np.exp(-(-1.0 + math.log(true_or) / 10 * (x - 15.0))))
        y = (rng.random(120) < p).astype(float)
        fit = logistic_fit(x, y, scale=10.0)
        covered += fit["ci_low"] <= true_or <= fit["ci_high"]
    assert 0.90 <= covered / runs <= 0.99


def test_logistic_fit_equals_the_2x2_table_odds_ratio():
    # a binary covariate 0 / 10 points: the logistic OR per 10 is the cross-product ratio and its
    # Wald SE is Woolf's sqrt(1/a + 1/b + 1/c + 1/d)
    a, b, c, d = 12, 8, 5, 15  # high & pCR, high & no pCR, low & pCR, low & no pCR
    x = np.r_[np.full(a + b, 10.0), np.zeros(c + d)]
    y = np.r_[np.ones(a), np.zeros(b), np.ones(c), np.zeros(d)]
    fit = logistic_fit(x, y, scale=10.0)
    odds = (a * d) / (b * c)
    se = math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    assert fit["odds_ratio"] == pytest.approx(odds, rel=1e-5)
    assert fit["ci_low"] == pytest.approx(odds * math.exp(-1.959964 * se), rel=1e-4)
    assert fit["ci_high"] == pytest.approx(odds * math.exp(1.959964 * se), rel=1e-4)
    z = math.log(odds) / se
    assert fit["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-4)


def test_median_ci_is_distribution_free_and_empty_below_six_values():
    assert all(math.isnan(v) for v in median_ci([1, 2, 3, 4, 5]))
    lo, hi = median_ci(np.arange(1, 7))
    assert (lo, hi) == (1.0, 6.0)  # n = 6: the extremes cover 1 - 2 / 64 = 96.9%
    lo, hi = median_ci(np.arange(100))
    assert lo < 49.5 < hi
    assert hi - lo < 25


# ------------------------------------------------------------------------------- edge cases


def test_no_pairs_gives_nan_and_a_note_not_a_crash():
    df = simulate_cohort(20, seed=1)
    df = df[df["timepoint"] == "pre"]
    with pytest.warns(TilscoreWarning) as record:
        table = paired_change(df, metrics=["pct_positive"])
    assert any("no slide has timepoint 'post'" in str(w.message) for w in record)
    assert (table["n_pairs"] == 0).all()
    assert table["p_value"].isna().all()
    assert table["note"].str.contains("no patient has both").all()


def test_a_marker_missing_after_treatment_is_reported_per_marker():
    df = simulate_cohort(30, seed=2, markers=("CD8", "CD68"), missing_post=0.2)
    df = df[~((df["marker"] == "CD68") & (df["timepoint"] == "post"))]
    with pytest.warns(TilscoreWarning, match="carry a note"):
        table = paired_change(df, metrics=["pct_positive"])
    cd68 = table[table["marker"] == "CD68"]
    assert (cd68["n_pairs"] == 0).all()
    assert cd68["p_value"].isna().all()
    cd8 = table[table["marker"] == "CD8"]
    assert (cd8["n_pre"] == 30).all()
    assert (cd8["n_pairs"] == cd8["n_post"]).all()
    assert (cd8["n_pairs"] < 30).all()
    assert cd8["p_value"].notna().all()


def test_too_few_pairs_and_patients_are_noted():
    df = simulate_cohort(2, seed=4)
    with pytest.warns(TilscoreWarning):
        paired = paired_change(df, metrics=["pct_positive"])
    assert paired["note"].str.contains("only 2 pair").all()
    assert paired["p_value"].isna().all()
    assert paired["pre_median"].notna().all()
    with pytest.warns(TilscoreWarning):
        assoc = pcr_association(df, metrics=["pct_positive"])
    assert assoc["note"].str.contains("too few patients").all()
    assert assoc["odds_ratio_per_10"].isna().all()


def test_perfect_separation_is_not_estimated():
    df = simulate_cohort(40, seed=6)
    pre = df[(df["compartment"] == "stromal") & (df["timepoint"] == "pre")]
    responders = set(pre.loc[pre["pct_positive"] > pre["pct_positive"].median(), "patient"])
    df["pcr"] = df["patient"].isin(responders).astype(int)
    with pytest.warns(TilscoreWarning, match="separation"):
        table = pcr_association(df, metrics=["pct_positive"], timepoints=["pre"])
    row = _row(table, "stromal", timepoint="pre")
    assert math.isnan(row["odds_ratio_per_10"])
    assert math.isnan(row["ci_low"])
    assert "separation" in row["note"]
    other = _row(table, "intratumoral", timepoint="pre")
    assert np.isfinite(other["odds_ratio_per_10"])


def test_several_slides_of_a_patient_are_averaged():
    df = simulate_cohort(10, seed=7, compartments=("stromal",))
    first = df[(df["patient"] == "P0001") & (df["timepoint"] == "pre")]
    extra = first.assign(slide_id="P0001_pre_CD8_b", pct_positive=first["pct_positive"] + 10.0)
    table = paired_change(pd.concat([df, extra]), metrics=["pct_positive"])
    row = table.iloc[0]
    assert row["n_pairs"] == 10
    assert "several slides" in row["note"]
    pre = _values(df, "stromal", "pre").copy()
    pre[0] += 5.0  # the mean of the two slides
    assert row["pre_median"] == pytest.approx(np.median(pre))


def test_density_odds_ratio_is_per_100_cells_per_mm2():
    df = simulate_cohort(200, seed=8)
    table = pcr_association(df, metrics=["density_per_mm2"], timepoints=["pre"])
    row = _row(table, "stromal", "density_per_mm2", timepoint="pre")
    assert row["per"] == "100 cells/mm²"
    # density = % / 100 x ~2500 cells/mm², so 100 cells/mm² is about 4 points of %
    pct = _row(pcr_association(df, ["pct_positive"], ["pre"]), "stromal", timepoint="pre")
    expected = pct["odds_ratio_per_10"] ** (100 / 2500 * 100 / 10)
    assert row["odds_ratio_per_10"] == pytest.approx(expected, rel=0.1)


# ---------------------------------------------------------------------------- input checks


def test_manifest_supplies_patient_timepoint_and_pcr(tmp_path):
    df = simulate_cohort(25, seed=9)
    summary = tmp_path / "summary.csv"
    df.drop(columns=["patient", "timepoint", "pcr"]).to_csv(summary, index=False)
    manifest = df[["slide_id", "patient", "timepoint", "pcr"]].drop_duplicates()
    by_id = tmp_path / "by_id.csv"
    manifest.to_csv(by_id, index=False)
    by_path = tmp_path / "by_path.csv"
    manifest.assign(path="/data/" + manifest["slide_id"] + ".svs").drop(columns="slide_id").to_csv(
        by_path, index=False
    )
    expected = paired_change(df, metrics=["pct_positive"])
    no_path = tmp_path / "no_path.csv"  # then the manifest's file name stems are the slide ids
    pd.read_csv(summary).drop(columns="path").to_csv(no_path, index=False)
    for s, m in ((summary, by_id), (summary, by_path), (no_path, by_path)):
        joined = load_cohort(s, m)
        pd.testing.assert_frame_equal(paired_change(joined, metrics=["pct_positive"]), expected)


def test_manifest_repeats_are_fine_but_conflicts_are_errors(tmp_path):
    df = simulate_cohort(6, seed=1)
    summary = df.drop(columns=["pcr"])
    manifest = df[["slide_id", "pcr"]]  # one row per slide x compartment: identical repeats
    assert manifest["slide_id"].duplicated().any()
    joined = load_cohort(summary, manifest)
    assert (joined["pcr"].to_numpy() == df["pcr"].to_numpy()).all()
    bad = manifest.copy()
    bad.loc[bad.index[0], "pcr"] = 1 - bad.loc[bad.index[0], "pcr"]
    with pytest.raises(TilscoreError, match="more than once with different values"):
        load_cohort(summary, bad)


def test_manifest_without_the_summary_slides_is_an_error(tmp_path):
    df = simulate_cohort(5, seed=1)
    other = pd.DataFrame({"slide_id": ["X1", "X2"], "patient": ["a", "b"], "pcr": [0, 1]})
    path = tmp_path / "manifest.csv"
    other.to_csv(path, index=False)
    with pytest.raises(TilscoreError, match=r"manifest\.csv: no slide of the summary"):
        load_cohort(df, path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"a,b\n1,2\n", "no column 'slide_id'"),
        (b"slide_id,marker,compartment,pct_positive\n", "no rows"),
        (b"slide_id,marker,compartment,pct_positive\ns1,CD8,stromal,lots\n", "non-number"),
        (b"slide_id,marker,compartment,pct_positive,pcr\ns1,CD8,stromal,5,maybe\n", "pcr"),
        (b"\xff\xfe\x00\x01\x02 binary \x00\x00", "cannot read"),
    ],
)
def test_bad_summary_names_the_file(tmp_path, content, message):
    path = tmp_path / "summary.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TilscoreError, match=message) as info:
        load_cohort(path)
    assert str(path) in str(info.value)


def test_missing_columns_and_conflicting_pcr_are_clear_errors(tmp_path):
    df = simulate_cohort(12, seed=2)
    path = tmp_path / "summary.csv"
    df.drop(columns=["patient", "timepoint"]).to_csv(path, index=False)
    with pytest.raises(TilscoreError, match=r"summary\.csv: .*'patient', 'timepoint'.*manifest"):
        paired_change(load_cohort(path))
    df.loc[df.index[0], "pcr"] = 1 - df.loc[df.index[0], "pcr"]
    with pytest.raises(TilscoreError, match="pcr 0 and with pcr 1"):
        pcr_association(df)


def test_run_cohort_without_pcr_still_writes_the_paired_analysis(tmp_path):
    df = simulate_cohort(15, seed=3).drop(columns="pcr")
    with pytest.warns(TilscoreWarning, match="pCR association is skipped"):
        files = run_cohort(df, out_dir=tmp_path, metrics=["pct_positive"])
    assert len(pd.read_csv(files["paired"])) == 2
    assoc = pd.read_csv(files["association"])
    assert len(assoc) == 0
    assert list(assoc.columns) == list(ASSOCIATION_COLUMNS)
    assert "forest" not in files


# ------------------------------------------------------------------------------------- CLI


def test_cli_cohort_end_to_end(tmp_path, capsys):
    df = simulate_cohort(30, seed=4, markers=("CD8", "CD68"), missing_post=0.1)
    summary = tmp_path / "summary.csv"
    df.drop(columns=["pcr"]).to_csv(summary, index=False)
    manifest = tmp_path / "manifest.csv"
    df[["slide_id", "pcr"]].to_csv(manifest, index=False)
    out = tmp_path / "cohort"
    argv = ["cohort", str(summary), "--manifest", str(manifest), "-o", str(out)]
    assert main([*argv, "--metric", "pct_positive"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed
    assert "CD8 stromal pct_positive: median" in printed
    assert "pCR at pre: OR" in printed
    names = {p.name for p in out.iterdir()}
    assert names == {
        "paired.csv",
        "association.csv",
        "slope_pct_positive.png",
        "box_pct_positive.png",
        "forest.png",
        "report.html",
    }
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assoc = pd.read_csv(out / "association.csv")
    for col in ("marker", "compartment", "metric", "n", "odds_ratio_per_10", "ci_low"):
        assert col in assoc.columns
    assert len(assoc) == 2 * 2 * 2  # markers x compartments x timepoints
    paired = pd.read_csv(out / "paired.csv")
    n_post = df.loc[df["timepoint"] == "post", "patient"].nunique()
    assert 0 < n_post < 30
    assert set(paired["marker"]) == {"CD8", "CD68"}
    assert (paired["n_pairs"] == n_post).all()
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3
    assert 'src="http' not in report
    assert "Wilcoxon" in report
    assert "CD68" in report


def test_cli_cohort_bad_csv_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "summary.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["cohort", str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tilscore cohort: error:")
    assert str(bad) in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
