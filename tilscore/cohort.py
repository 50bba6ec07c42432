"""Cohort analysis: paired pre/post-treatment change and association with pCR.

What the neoadjuvant studies in ``docs/domain.md`` compute, per marker x compartment x metric,
from the batch summary (``OUT/summary.csv``: one row per slide x compartment) and the manifest
columns ``patient``, ``timepoint`` (``pre`` / ``post``) and ``pcr`` (0/1):

- :func:`paired_change`: per patient the post-treatment minus the pre-treatment value, medians
  and quartiles before and after, the median change with a distribution-free 95% CI, and the
  Wilcoxon signed-rank p;
- :func:`pcr_association`: logistic regression of pCR on the value at each timepoint, as an odds
  ratio per 10 percentage points (per 100 cells/mm² for densities) with its 95% Wald CI and p;
- :func:`run_cohort`: both tables, slope, box and forest plots and a self-contained
  ``report.html`` in one folder (what ``tilscore cohort`` runs).

A patient with several slides of one marker at one timepoint contributes the mean of their values.
A result that cannot be estimated (no pairs, too few patients, perfect separation) is NaN with the
reason in the ``note`` column and a :class:`~tilscore.errors.TilscoreWarning`; nothing raises on
thin data. :func:`simulate_cohort` draws summary tables with a known effect for tests and for
checking a study design.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._version import __version__
from .errors import TilscoreError, TilscoreWarning
from .export import atomic_write

DEFAULT_METRICS: tuple[str, ...] = ("pct_positive", "density_per_mm2", "area_fraction_pct")

#: metric -> (units of x per odds ratio, the unit in words). Percentages: the odds ratio per 10
#: percentage points, as the TIL literature reports it. Densities: per 100 cells/mm² (linear, so
#: that 0 cells/mm² needs no pseudo-count; a typical stromal CD8 density spans 0-2000 cells/mm²).
METRIC_SCALES: dict[str, tuple[float, str]] = {
    "pct_positive": (10.0, "10 percentage points"),
    "area_fraction_pct": (10.0, "10 percentage points"),
    "density_per_mm2": (100.0, "100 cells/mm²"),
    "h_score": (10.0, "10 H-score points"),
}

METRIC_LABELS: dict[str, str] = {
    "pct_positive": "% positive cells",
    "density_per_mm2": "positive cells / mm²",
    "area_fraction_pct": "area fraction (%)",
    "h_score": "H-score",
}

PAIRED_COLUMNS: tuple[str, ...] = (
    "marker",
    "compartment",
    "metric",
    "n_pre",
    "n_post",
    "n_pairs",
    "pre_median",
    "pre_q1",
    "pre_q3",
    "post_median",
    "post_q1",
    "post_q3",
    "median_change",
    "change_ci_low",
    "change_ci_high",
    "n_increased",
    "p_value",
    "note",
)

ASSOCIATION_COLUMNS: tuple[str, ...] = (
    "marker",
    "compartment",
    "metric",
    "timepoint",
    "n",
    "n_pcr",
    "per",
    "odds_ratio_per_10",
    "ci_low",
    "ci_high",
    "p_value",
    "note",
)

_ID_COLUMNS = ("slide_id", "marker", "compartment")
_MANIFEST_COLUMNS = ("patient", "timepoint", "pcr")
_PCR_WORDS = {
    "1": 1.0,
    "0": 0.0,
    "true": 1.0,
    "false": 0.0,
    "yes": 1.0,
    "no": 0.0,
    "pcr": 1.0,
    "no pcr": 0.0,
    "1.0": 1.0,
    "0.0": 0.0,
}
_Z95 = 1.959963984540054


# --------------------------------------------------------------------------------------- input


def _read_table(path: str | os.PathLike, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        kind = "a folder, not a file" if path.is_dir() else "no such file"
        raise TilscoreError(kind, path=path, hint=f"Pass the {what} CSV file")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except pd.errors.EmptyDataError as e:
        raise TilscoreError("the file is empty", path=path, hint=f"Pass the {what} CSV") from e
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TilscoreError(
            f"cannot read it as a table ({e})", path=path, hint=f"Pass the {what} as a CSV file"
        ) from e


def _parse_pcr(values: pd.Series, source: str | None) -> pd.Series:
    """0/1 (also true/false, yes/no) as float, missing as NaN; anything else is an error."""
    out = pd.Series(np.nan, index=values.index, dtype=float)
    bad = []
    for idx, v in values.items():
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            continue
        if isinstance(v, (bool, np.bool_)):
            out[idx] = float(v)
            continue
        word = str(v).strip().lower()
        if word in ("", "nan", "na"):
            continue
        if word in _PCR_WORDS:
            out[idx] = _PCR_WORDS[word]
        else:
            bad.append(v)
    if bad:
        shown = ", ".join(repr(b) for b in sorted(set(map(str, bad)))[:5])
        raise TilscoreError(
            f"column 'pcr' must be 0 or 1 (pathological complete response), found {shown}",
            path=source,
            hint="Write 1 for pCR, 0 for residual disease and leave unknown cells empty",
        )
    return out


def _join_manifest(
    summary: pd.DataFrame, manifest: pd.DataFrame, source: str | None, msource: str | None
) -> pd.DataFrame:
    """Add the manifest's patient / timepoint / pcr (and other) columns to the summary rows."""
    wanted = [c for c in manifest.columns if c not in ("marker", "compartment")]
    m = manifest[wanted].copy()
    s = summary.copy()
    candidates: list[tuple[str, pd.Series, pd.Series]] = []
    if "slide_id" in m and "slide_id" in s:
        candidates.append(("slide_id", s["slide_id"].astype(str), m["slide_id"].astype(str)))
    if "path" in m:
        mpath = m["path"].astype(str)
        if "path" in s:
            spath = s["path"].astype(str)
            candidates.append(("path", spath.map(os.path.normpath), mpath.map(os.path.normpath)))
            candidates.append(
                ("file name", spath.map(lambda p: Path(p).name), mpath.map(lambda p: Path(p).name))
            )
        candidates.append(
            (
                "slide_id = file name stem",
                s["slide_id"].astype(str),
                mpath.map(lambda p: Path(p).stem),
            )
        )
    if not candidates:
        raise TilscoreError(
            "the manifest has neither a slide_id nor a path column to join it to the summary",
            path=msource,
            hint="Add a slide_id column (as in the summary) or the slides' path",
        )
    match = next((c for c in candidates if c[1].isin(set(c[2])).any()), None)
    if match is None:
        raise TilscoreError(
            "no slide of the summary is in the manifest (matched by "
            + ", ".join(c[0] for c in candidates)
            + ")",
            path=msource,
            hint=f"Check that the manifest lists the slides of {source or 'the summary'}",
        )
    how, skey, mkey = match
    m = m.drop(columns=[c for c in ("slide_id", "path") if c in m and c in s])
    m = m.assign(_key=mkey.to_numpy()).drop_duplicates()  # repeated identical rows are fine
    m = m.set_index("_key").rename_axis(None)
    dup = m.index[m.index.duplicated()]
    if len(dup):
        raise TilscoreError(
            f"the manifest lists slide {dup[0]!r} more than once with different values "
            f"(matched by {how})",
            path=msource,
            hint="Keep one row per slide",
        )
    joined = m.reindex(skey.to_numpy())
    joined.index = s.index
    unmatched = int(joined.isna().all(axis=1).sum()) if len(m.columns) else 0
    if unmatched:
        ids = s.loc[joined.isna().all(axis=1), "slide_id"].astype(str).unique()
        warnings.warn(
            f"{msource or 'manifest'}: {len(ids)} slide(s) of the summary are not in the manifest "
            f"(e.g. {ids[0]!r}); they have no patient, timepoint or pcr",
            TilscoreWarning,
            stacklevel=3,
        )
    for col in joined.columns:
        if col not in s:
            s[col] = joined[col]
            continue
        new = joined[col]
        both = new.notna() & s[col].notna()
        if both.any() and (new[both].astype(str) != s.loc[both, col].astype(str)).any():
            warnings.warn(
                f"{msource or 'manifest'}: column {col!r} differs from the summary's for some "
                "slides; the manifest's values are used",
                TilscoreWarning,
                stacklevel=3,
            )
        s[col] = new.where(new.notna(), s[col])
    return s


def _use_reviewed(df: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The batch summary with each slide reviewed since the batch (``OUT/<slide_id>/
    summary_reviewed.csv``) counted with its reviewed rows; column ``summary_from`` says which."""
    if "slide_id" not in df or "compartment" not in df:
        return df
    df = df.copy()
    if "summary_from" not in df:
        df["summary_from"] = "scored"
    for sid in pd.unique(df["slide_id"].astype(str)):
        path = out / sid / "summary_reviewed.csv"
        if not path.is_file():
            continue
        try:
            rev = pd.read_csv(path).set_index("compartment")
        except (OSError, ValueError, KeyError):
            continue  # an unreadable reviewed summary: the batch's rows stay (scored)
        rows = (df["slide_id"].astype(str) == sid) & df["compartment"].isin(rev.index)
        cols = [c for c in rev.columns if c in df.columns and c not in _ID_COLUMNS]
        for col in cols:
            df.loc[rows, col] = df.loc[rows, "compartment"].map(rev[col]).to_numpy()
        df.loc[rows, "summary_from"] = "reviewed"
    return df


def load_cohort(
    summary: str | os.PathLike | pd.DataFrame,
    manifest: str | os.PathLike | pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a batch summary (and manifest) into one checked table, one row per slide x compartment.

    Parameters
    ----------
    summary
        ``OUT/summary.csv`` of ``tilscore batch`` (CSV or Parquet path) or a DataFrame with at
        least ``slide_id``, ``marker``, ``compartment`` and the metric columns.
    manifest
        Optional CSV (or DataFrame) with ``patient``, ``timepoint`` and ``pcr`` per slide, joined on
        ``slide_id`` where both have it, else on ``path`` (then on the file name, then on the file
        name without extension against ``slide_id``). Its values replace the summary's.
    metrics
        Columns that must be present and numeric (default: the :data:`DEFAULT_METRICS` present).

    Returns
    -------
    pandas.DataFrame
        ``patient`` as str, ``timepoint`` lower-case str, ``pcr`` as float 0/1/NaN, metrics float;
        ``attrs["source"]`` names the summary file. Slides reviewed in napari after the batch
        (``OUT/<slide_id>/summary_reviewed.csv``) count with their reviewed values; the column
        ``summary_from`` says "reviewed" or "scored".
    """
    source = None
    if isinstance(summary, pd.DataFrame):
        df = summary.copy()
        source = df.attrs.get("source")
    else:
        source = os.fspath(summary)
        df = _use_reviewed(_read_table(summary, "summary"), Path(source).parent)
    if manifest is not None:
        msource = None if isinstance(manifest, pd.DataFrame) else os.fspath(manifest)
        mdf = manifest if isinstance(manifest, pd.DataFrame) else _read_table(manifest, "manifest")
        df = _join_manifest(df, mdf, source, msource)
    missing = [c for c in _ID_COLUMNS if c not in df]
    if missing:
        raise TilscoreError(
            f"the summary has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(map(str, df.columns[:12]))})",
            path=source,
            hint="Pass OUT/summary.csv of `tilscore batch`: one row per slide x compartment",
        )
    if len(df) == 0:
        raise TilscoreError(
            "the summary has no rows (no slide was scored)",
            path=source,
            hint="Check errors.csv of the batch and score the slides first",
        )
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if m in df]
        if not metrics:
            raise TilscoreError(
                f"the summary has none of the metric columns {', '.join(DEFAULT_METRICS)}",
                path=source,
                hint="Pass OUT/summary.csv of `tilscore batch`",
            )
    for metric in metrics:
        if metric not in df:
            raise TilscoreError(
                f"the summary has no metric column {metric!r}",
                path=source,
                hint=f"Choose among {', '.join(c for c in df.columns if c not in _ID_COLUMNS)}",
            )
        values = pd.to_numeric(df[metric], errors="coerce")
        bad = values.isna() & df[metric].notna() & (df[metric].astype(str).str.strip() != "")
        if bad.any():
            raise TilscoreError(
                f"column {metric!r} holds a non-number ({df.loc[bad, metric].iloc[0]!r})",
                path=source,
                hint="Metric columns must be numbers; leave unknown values empty",
            )
        infinite = values.notna() & ~np.isfinite(values.astype(float))
        if infinite.any():  # not dropped without a word (issue 17)
            warnings.warn(
                f"{source or 'summary'}: column {metric!r} holds {int(infinite.sum())} "
                "infinite value(s); they are left out like empty ones",
                TilscoreWarning,
                stacklevel=3,
            )
        df[metric] = values.astype(float).where(np.isfinite(values.astype(float)))  # inf -> NaN
    for col in ("slide_id", "marker", "compartment"):
        df[col] = df[col].astype(str)
    if "patient" in df:
        df["patient"] = df["patient"].map(lambda v: None if pd.isna(v) else str(v).strip())
    if "timepoint" in df:
        df["timepoint"] = df["timepoint"].map(
            lambda v: None if pd.isna(v) else str(v).strip().lower()
        )
    if "pcr" in df:
        df["pcr"] = _parse_pcr(df["pcr"], source)
    df.attrs["source"] = source
    return df


def _as_cohort(summary: Any, metrics: Sequence[str] | None) -> pd.DataFrame:
    if (
        isinstance(summary, pd.DataFrame)
        and summary.attrs.get("_checked")
        and all(m in summary for m in metrics or ())
    ):
        return summary
    df = load_cohort(summary, metrics=metrics)
    df.attrs["_checked"] = True
    return df


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df or df[c].isna().all()]
    if missing:
        raise TilscoreError(
            f"{what} needs the column(s) {', '.join(repr(c) for c in missing)}, which the summary "
            "lacks or leaves empty",
            path=df.attrs.get("source"),
            hint="Add them to the batch manifest or pass a manifest CSV (--manifest) with "
            "slide_id, patient, timepoint (pre/post) and pcr (0/1)",
        )


def _patient_values(g: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Patient x timepoint table of the metric (mean over a patient's slides), and duplicates."""
    g = g[g["patient"].notna() & g[metric].notna()]
    if "timepoint" in g:
        g = g[g["timepoint"].notna()]
        keys = ["patient", "timepoint"]
    else:
        g = g.assign(timepoint="all")
        keys = ["patient", "timepoint"]
    return g.groupby(keys)[metric].agg(["mean", "size"])


def _warn_notes(table: pd.DataFrame, what: str) -> None:
    noted = table[table["note"] != ""]
    if len(noted):
        first = noted.iloc[0]
        warnings.warn(
            f"{what}: {len(noted)} of {len(table)} rows carry a note (e.g. {first['marker']} "
            f"{first['compartment']} {first['metric']}: {first['note']}); see the note column",
            TilscoreWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------- paired change


def median_ci(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """Distribution-free confidence interval of a median from order statistics.

    The interval ``[x_(k), x_(n-k+1)]`` with the largest ``k`` whose binomial (n, 1/2) tail
    keeps the coverage at least ``confidence``. NaN, NaN for fewer than 6 values at 95%, where no
    such interval exists.
    """
    from scipy import stats

    x = np.sort(np.asarray(values, dtype=float)[np.isfinite(np.asarray(values, dtype=float))])
    n = x.size
    if n == 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    j = int(stats.binom.ppf(alpha / 2, n, 0.5))
    if stats.binom.cdf(j, n, 0.5) > alpha / 2:
        j -= 1
    if j < 0:
        return math.nan, math.nan
    return float(x[j]), float(x[n - 1 - j])


def paired_change(
    summary: pd.DataFrame | str | os.PathLike,
    metrics: Sequence[str] = DEFAULT_METRICS,
    pre: str = "pre",
    post: str = "post",
    *,
    min_pairs: int = 3,
) -> pd.DataFrame:
    """Pre- vs post-treatment change per patient, per marker x compartment x metric.

    Parameters
    ----------
    summary
        Table from :func:`load_cohort` (or a path / DataFrame it accepts) with ``patient`` and
        ``timepoint``.
    metrics
        Metric columns, e.g. ``pct_positive`` (%), ``density_per_mm2`` (cells/mm²),
        ``area_fraction_pct`` (%).
    pre, post
        The ``timepoint`` values of the two biopsies (case-insensitive).
    min_pairs
        Fewest pairs for a Wilcoxon p; fewer gives NaN and a note.

    Returns
    -------
    pandas.DataFrame
        :data:`PAIRED_COLUMNS`: ``n_pre`` / ``n_post`` patients with a value, ``n_pairs`` with both;
        medians and quartiles (``q1``, ``q3``) over the paired patients, in the metric's unit;
        ``median_change`` the median of the per-patient differences post - pre with its
        distribution-free 95% CI; ``n_increased`` pairs that rose; ``p_value`` two-sided Wilcoxon
        signed-rank (zero differences dropped); ``note`` why a value is NaN, or "".
    """
    from scipy import stats

    df = _as_cohort(summary, metrics)
    _require(df, ["patient", "timepoint"], "the paired pre/post analysis")
    pre, post = str(pre).strip().lower(), str(post).strip().lower()
    present = set(df["timepoint"].dropna())
    absent = [t for t in (pre, post) if t not in present]
    if absent:
        warnings.warn(
            f"{df.attrs.get('source') or 'summary'}: no slide has timepoint "
            f"{', '.join(repr(a) for a in absent)} (timepoints: {', '.join(sorted(present))}); "
            "no pairs",
            TilscoreWarning,
            stacklevel=2,
        )
    others = sorted(t for t in present if t not in (pre, post))
    if others:  # slides of other timepoints are not paired: said, not dropped silently
        n_other = int(df["timepoint"].isin(others).sum())
        warnings.warn(
            f"{df.attrs.get('source') or 'summary'}: {n_other} row(s) with timepoint "
            f"{', '.join(repr(t) for t in others)} are not {pre!r} or {post!r} and are left out "
            "of the pairs (--pre / --post name the two)",
            TilscoreWarning,
            stacklevel=2,
        )
    rows = []
    for (marker, comp), g in df.groupby(["marker", "compartment"], sort=True):
        for metric in metrics:
            row: dict[str, Any] = {c: math.nan for c in PAIRED_COLUMNS}
            row.update(marker=marker, compartment=comp, metric=metric, note="")
            tab = _patient_values(g, metric)
            wide = tab["mean"].unstack("timepoint") if len(tab) else pd.DataFrame()
            a = wide[pre] if pre in wide else pd.Series(dtype=float)
            b = wide[post] if post in wide else pd.Series(dtype=float)
            row["n_pre"], row["n_post"] = int(a.notna().sum()), int(b.notna().sum())
            pairs = pd.concat([a.rename("pre"), b.rename("post")], axis=1).dropna()
            n = len(pairs)
            row["n_pairs"] = n
            notes = []
            several = tab[tab["size"] > 1]
            if len(several):
                notes.append(f"{len(several)} patient-timepoints with several slides: mean used")
            if n == 0:
                notes.insert(0, f"no patient has both a {pre} and a {post} value")
            else:
                x, y = pairs["pre"].to_numpy(), pairs["post"].to_numpy()
                d = y - x
                row["pre_median"], row["post_median"] = np.median(x), np.median(y)
                row["pre_q1"], row["pre_q3"] = np.percentile(x, [25, 75])
                row["post_q1"], row["post_q3"] = np.percentile(y, [25, 75])
                row["median_change"] = float(np.median(d))
                row["change_ci_low"], row["change_ci_high"] = median_ci(d)
                row["n_increased"] = int((d > 0).sum())
                if n < min_pairs:
                    notes.insert(0, f"only {n} pair(s), fewer than {min_pairs}: no test")
                elif np.all(d == 0):
                    notes.insert(0, "no pair changed: no test")
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = stats.wilcoxon(y, x, zero_method="wilcox")
                    row["p_value"] = float(res.pvalue)
            row["note"] = "; ".join(notes)
            rows.append(row)
    table = pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
    for c in ("n_pre", "n_post", "n_pairs"):
        table[c] = table[c].astype(int)
    table["n_increased"] = table["n_increased"].astype("Int64")
    informative = table["note"].str.fullmatch(_QUIET_NOTE)
    _warn_notes(table[~informative], "paired change")
    return table


# a note that is information, not a failure (no warning)
_QUIET_NOTE = r"\d+ patient-timepoints with several slides: mean used"


# ---------------------------------------------------------------------------- pCR association


def logistic_fit(x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> dict[str, Any]:
    """Logistic regression of a 0/1 outcome on one covariate, as an odds ratio per ``scale`` units.

    Fitted by maximum likelihood (statsmodels ``Logit``) on the centred covariate; the interval
    is the 95% Wald interval ``exp(beta ± 1.96 se)`` and ``p`` the Wald test of beta = 0.

    Returns
    -------
    dict
        ``odds_ratio``, ``ci_low``, ``ci_high``, ``p_value`` (NaN where not estimable) and ``note``:
        "" or why not (no variation, perfect or quasi-complete separation, no convergence).
    """
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationError

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    out: dict[str, Any] = dict(
        odds_ratio=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan, note=""
    )
    x0, x1 = x[y == 0], x[y == 1]
    if x0.size == 0 or x1.size == 0:
        out["note"] = "all patients in one outcome class"
        return out
    if np.ptp(x) == 0:
        out["note"] = "the value is the same in every patient"
        return out
    if x1.min() >= x0.max() or x0.min() >= x1.max():
        out["note"] = (
            "perfect separation (every pCR patient lies on one side of every other): the odds "
            "ratio is infinite or zero and cannot be estimated"
        )
        return out
    xs = (x - x.mean()) / scale
    design = np.column_stack([np.ones_like(xs), xs])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sm.Logit(y, design).fit(disp=0, maxiter=200)
    except (np.linalg.LinAlgError, PerfectSeparationError, ValueError) as e:
        out["note"] = f"fit failed ({e})"
        return out
    beta, se = float(res.params[1]), float(res.bse[1])
    if not res.mle_retvals.get("converged", False) or not (math.isfinite(se) and se > 0):
        out["note"] = "the fit did not converge"
        return out
    out.update(
        odds_ratio=math.exp(beta),
        ci_low=math.exp(beta - _Z95 * se),
        ci_high=math.exp(beta + _Z95 * se),
        p_value=float(res.pvalues[1]),
    )
    return out


def _scale_for(metric: str, scales: Mapping[str, Any] | None) -> tuple[float, str]:
    if scales and metric in scales:
        value = scales[metric]
        if isinstance(value, tuple):
            return float(value[0]), str(value[1])
        return float(value), f"{float(value):g} units of {metric}"
    if metric in METRIC_SCALES:
        return METRIC_SCALES[metric]
    return 10.0, f"10 units of {metric}"


def pcr_association(
    summary: pd.DataFrame | str | os.PathLike,
    metrics: Sequence[str] = DEFAULT_METRICS,
    timepoints: Sequence[str] | None = None,
    *,
    scales: Mapping[str, Any] | None = None,
    min_n: int = 10,
    min_per_class: int = 3,
) -> pd.DataFrame:
    """Association of each metric with pCR: odds ratio from a logistic regression.

    Parameters
    ----------
    summary
        Table from :func:`load_cohort` (or a path / DataFrame it accepts) with ``patient`` and
        ``pcr`` (0/1); ``timepoint`` optional (without it all slides form one timepoint "all").
    metrics
        Metric columns.
    timepoints
        Timepoints to analyse separately (default: every one present, ``pre`` and ``post``
        first).
    scales
        Per metric the number of units one odds ratio refers to (default :data:`METRIC_SCALES`:
        10 percentage points for percentages, 100 cells/mm² for densities); a value or a
        ``(value, "unit in words")`` tuple.
    min_n, min_per_class
        Fewest patients, and fewest in each outcome class, for a fit; fewer gives NaN and a note.

    Returns
    -------
    pandas.DataFrame
        :data:`ASSOCIATION_COLUMNS`: ``n`` patients with a value and a known pCR, ``n_pcr`` of
        them with pCR, ``per`` the unit of ``odds_ratio_per_10`` (the odds ratio per that many
        units), ``ci_low`` / ``ci_high`` its 95% Wald interval, ``p_value`` the Wald p, ``note``.
    """
    df = _as_cohort(summary, metrics)
    _require(df, ["patient", "pcr"], "the pCR association")
    source = df.attrs.get("source")
    known = df[df["patient"].notna() & df["pcr"].notna()]
    per_patient = known.groupby("patient")["pcr"].nunique()
    conflict = per_patient[per_patient > 1]
    if len(conflict):
        raise TilscoreError(
            f"patient {conflict.index[0]!r} has slides with pcr 0 and with pcr 1",
            path=source,
            hint="pCR is one outcome per patient: correct the manifest",
        )
    pcr = known.groupby("patient")["pcr"].first()
    if "timepoint" in df and df["timepoint"].notna().any():
        present = list(dict.fromkeys(df["timepoint"].dropna()))
    else:
        df = df.drop(columns="timepoint", errors="ignore")
        present = ["all"]
    if timepoints is None:
        order = [t for t in ("pre", "post") if t in present]
        timepoints = order + sorted(t for t in present if t not in order)
    else:
        timepoints = [str(t).strip().lower() for t in timepoints]
    rows = []
    for (marker, comp), g in df.groupby(["marker", "compartment"], sort=True):
        for metric in metrics:
            scale, unit = _scale_for(metric, scales)
            tab = _patient_values(g, metric)
            for tp in timepoints:
                row: dict[str, Any] = {c: math.nan for c in ASSOCIATION_COLUMNS}
                row.update(marker=marker, compartment=comp, metric=metric, timepoint=tp, per=unit)
                vals = (
                    tab["mean"].xs(tp, level="timepoint")
                    if tp in tab.index.get_level_values("timepoint")
                    else pd.Series(dtype=float)
                )
                both = pd.concat([vals.rename("x"), pcr.rename("y")], axis=1, join="inner")
                both = both.dropna()
                n, n_pcr = len(both), int(both["y"].sum()) if len(both) else 0
                row["n"], row["n_pcr"] = n, n_pcr
                if n < min_n or min(n_pcr, n - n_pcr) < min_per_class:
                    row["note"] = (
                        f"too few patients ({n}, {n_pcr} with pCR; need {min_n} and "
                        f"{min_per_class} in each outcome class)"
                    )
                else:
                    fit = logistic_fit(both["x"].to_numpy(), both["y"].to_numpy(), scale)
                    row.update(
                        odds_ratio_per_10=fit["odds_ratio"],
                        ci_low=fit["ci_low"],
                        ci_high=fit["ci_high"],
                        p_value=fit["p_value"],
                        note=fit["note"],
                    )
                rows.append(row)
    table = pd.DataFrame(rows, columns=list(ASSOCIATION_COLUMNS))
    table["n"] = table["n"].astype(int)
    table["n_pcr"] = table["n_pcr"].astype(int)
    table["note"] = table["note"].fillna("")
    _warn_notes(table, "pCR association")
    return table


# ------------------------------------------------------------------------------------ plotting


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _panels(n: int, width: float = 3.0, height: float = 3.0):
    from matplotlib.figure import Figure

    ncols = min(4, max(n, 1))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


_PCR_COLOURS = {1.0: "#1b9e77", 0.0: "#7f7f7f"}


def plot_paired(
    summary: pd.DataFrame, metric: str = "pct_positive", pre: str = "pre", post: str = "post"
) -> bytes:
    """Slope plot (PNG bytes): one line per patient from pre to post, one panel per marker x
    compartment; green lines are patients with pCR, the black line joins the medians."""
    df = _as_cohort(summary, [metric])
    groups = [
        (key, _patient_values(g, metric)["mean"].unstack("timepoint"))
        for key, g in df.groupby(["marker", "compartment"], sort=True)
    ]
    groups = [(k, w[[pre, post]].dropna()) for k, w in groups if pre in w and post in w]
    groups = [(k, w) for k, w in groups if len(w)]
    fig, axes = _panels(max(len(groups), 1))
    if not groups:
        axes[0].text(0.5, 0.5, f"no {pre}/{post} pairs", ha="center", va="center")
        axes[0].set_axis_off()
        return _png(fig)
    pcr = df.dropna(subset=["patient"]).groupby("patient")["pcr"].first() if "pcr" in df else None
    for ax, ((marker, comp), w) in zip(axes, groups):
        for patient, (a, b) in w.iterrows():
            status = pcr.get(patient, math.nan) if pcr is not None else math.nan
            colour = _PCR_COLOURS.get(status, "#4c72b0")
            ax.plot([0, 1], [a, b], color=colour, alpha=0.5, lw=1, marker="o", ms=3)
        ax.plot([0, 1], [w[pre].median(), w[post].median()], color="black", lw=3, label="median")
        ax.set_xticks([0, 1], [pre, post])
        ax.set_xlim(-0.2, 1.2)
        ax.set_title(f"{marker} {comp} (n={len(w)})", fontsize=10)
        ax.set_ylabel(_label(metric))
    if pcr is not None and pcr.notna().any():
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=_PCR_COLOURS[1.0], label="pCR"),
            Line2D([], [], color=_PCR_COLOURS[0.0], label="no pCR"),
            Line2D([], [], color="black", lw=3, label="median"),
        ]
        axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    return _png(fig)


def plot_box(
    summary: pd.DataFrame, metric: str = "pct_positive", pre: str = "pre", post: str = "post"
) -> bytes:
    """Box plots (PNG bytes) of the patient values per timepoint, split by pCR where known; one
    panel per marker x compartment, the points are the patients."""
    df = _as_cohort(summary, [metric])
    has_pcr = "pcr" in df and df["pcr"].notna().any()
    pcr = df.dropna(subset=["patient"]).groupby("patient")["pcr"].first() if has_pcr else None
    groups = list(df.groupby(["marker", "compartment"], sort=True))
    fig, axes = _panels(max(len(groups), 1), width=3.4)
    rng = np.random.default_rng(0)
    for ax, ((marker, comp), g) in zip(axes, groups):
        tab = _patient_values(g, metric)["mean"]
        tps = list(dict.fromkeys(tab.index.get_level_values("timepoint")))
        tps = [t for t in (pre, post) if t in tps] + [t for t in tps if t not in (pre, post)]
        data, labels, colours = [], [], []
        for tp in tps:
            v = tab.xs(tp, level="timepoint")
            if pcr is not None:
                status = pcr.reindex(v.index)
                for s, name in ((0.0, "no pCR"), (1.0, "pCR")):
                    data.append(v[status == s].to_numpy())
                    labels.append(f"{tp}\n{name}")
                    colours.append(_PCR_COLOURS[s])
            else:
                data.append(v.to_numpy())
                labels.append(tp)
                colours.append("#4c72b0")
        if not data:
            ax.set_axis_off()
            continue
        pos = np.arange(1, len(data) + 1)
        keep = [i for i, d in enumerate(data) if len(d)]
        if keep:
            parts = ax.boxplot(
                [data[i] for i in keep], positions=pos[keep], widths=0.6, showfliers=False,
                patch_artist=True,
            )  # fmt: skip
            for i, patch in zip(keep, parts["boxes"]):
                patch.set_facecolor(colours[i])
                patch.set_alpha(0.35)
        for i, d in enumerate(data):
            ax.scatter(pos[i] + rng.uniform(-0.12, 0.12, len(d)), d, s=8, color=colours[i])
        ax.set_xticks(pos, labels, fontsize=8)
        ax.set_title(f"{marker} {comp}", fontsize=10)
        ax.set_ylabel(_label(metric))
    return _png(fig)


def plot_forest(association: pd.DataFrame) -> bytes:
    """Forest plot (PNG bytes): odds ratio of pCR with its 95% CI per row, log scale."""
    from matplotlib.figure import Figure

    rows = association.reset_index(drop=True)
    n = max(len(rows), 1)
    fig = Figure(figsize=(7.5, 0.8 + 0.28 * n), layout="constrained")
    ax = fig.subplots()
    ok = rows["odds_ratio_per_10"].notna() & rows["ci_low"].gt(0) & np.isfinite(rows["ci_high"])
    ys = np.arange(len(rows))[::-1]
    labels = [
        f"{r.marker} {r.compartment} {r.metric} ({r.timepoint}), per {r.per}"
        for r in rows.itertuples()
    ]
    finite = rows.loc[ok]
    if len(finite):
        y = ys[ok.to_numpy()]
        orr = finite["odds_ratio_per_10"].to_numpy()
        err = np.vstack([orr - finite["ci_low"].to_numpy(), finite["ci_high"].to_numpy() - orr])
        sig = (finite["p_value"] < 0.05).to_numpy()
        ax.errorbar(orr, y, xerr=err, fmt="none", ecolor="#555555", capsize=2)
        ax.scatter(orr, y, marker="s", color=np.where(sig, "#d95f02", "#4c72b0"), zorder=3)
        lo, hi = float(finite["ci_low"].min()), float(finite["ci_high"].max())
        ax.set_xlim(min(lo, 0.5) / 1.3, max(hi, 2.0) * 1.3)
    else:
        ax.set_xlim(0.25, 4)
    ax.set_xscale("log")
    for yv, good in zip(ys, ok.to_numpy()):
        if not good:
            ax.text(1.0, yv, "not estimable", ha="center", va="center", fontsize=7, color="#a00")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("odds ratio of pCR (95% CI); orange: p < 0.05")
    return _png(fig)


# -------------------------------------------------------------------------------------- report

_METHOD_TEXT = """
<p>Each slide x compartment row of the summary carries its patient, timepoint and pCR (from the
batch manifest or the manifest given here). A patient with several slides of one marker at one
timepoint contributes the mean of their values.</p>
<p><b>Paired change.</b> For each marker, compartment and metric, the patients with a value both
before ({pre}) and after ({post}) treatment form the pairs. Medians and quartiles (Q1-Q3) are over
the paired patients; the median change is the median of the per-patient differences {post} - {pre}
with a distribution-free 95% confidence interval from order statistics; p is the two-sided
Wilcoxon signed-rank test (scipy, zero differences dropped), computed from {min_pairs} pairs on.</p>
<p><b>Association with pCR.</b> For each marker, compartment, metric and timepoint, a logistic
regression of pCR (0/1) on the patient's value (statsmodels, maximum likelihood). The odds ratio is
given per 10 percentage points for percentages and per 100 cells/mm² for densities (column
<i>per</i>), with its 95% Wald interval exp(&beta; &plusmn; 1.96 SE) and Wald p. A fit needs
{min_n} patients and {min_per_class} in each outcome class; where every pCR patient lies on one side
of every other (perfect separation) the odds ratio does not exist and is left empty with a note.
p values are not adjusted for the number of tests.</p>
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f0f0f0} td:nth-child(-n+3){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#666;font-size:12px}
"""


def _fmt_table(table: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if v is None or v is pd.NA:
            return ""
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            if abs(v) != 0 and (abs(v) < 0.001 or abs(v) >= 1e5):
                return f"{v:.2e}"
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    return table.to_html(index=False, na_rep="", formatters={c: fmt for c in table.columns})


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def cohort_report_html(
    paired: pd.DataFrame,
    association: pd.DataFrame,
    images: Mapping[str, bytes],
    *,
    title: str = "tilscore cohort analysis",
    inputs: Mapping[str, Any] | None = None,
    method: Mapping[str, Any] | None = None,
) -> str:
    """The self-contained HTML report: inputs, method, tables, and the plots as base64 PNG."""
    defaults = dict(pre="pre", post="post", min_pairs=3, min_n=10, min_per_class=3)
    method = {**defaults, **(method or {})}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if inputs:
        parts.append("<table>")
        for k, v in inputs.items():
            parts.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Method</h2>" + _METHOD_TEXT.format(**method))
    parts.append("<h2>Paired pre/post change</h2>")
    parts.extend(_img(v, k) for k, v in images.items() if k.startswith("slope_"))
    parts.append(_fmt_table(paired) if len(paired) else "<p class='note'>not computed</p>")
    parts.append("<h2>Association with pCR</h2>")
    parts.extend(_img(v, k) for k, v in images.items() if k.startswith("forest"))
    parts.append(
        _fmt_table(association) if len(association) else "<p class='note'>not computed</p>"
    )
    parts.extend(_img(v, k) for k, v in images.items() if k.startswith("box_"))
    parts.append(
        f"<p class='note'>tilscore {html.escape(__version__)}, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p></body></html>"
    )
    return "\n".join(parts)


def run_cohort(
    summary_path: str | os.PathLike | pd.DataFrame,
    manifest_path: str | os.PathLike | pd.DataFrame | None = None,
    *,
    out_dir: str | os.PathLike,
    metrics: Sequence[str] | None = None,
    pre: str = "pre",
    post: str = "post",
    scales: Mapping[str, Any] | None = None,
    min_pairs: int = 3,
    min_n: int = 10,
    min_per_class: int = 3,
) -> dict[str, Path]:
    """Paired change and pCR association of a cohort, with plots and an HTML report.

    Writes (atomically) ``paired.csv``, ``association.csv``, ``slope_<metric>.png``,
    ``box_<metric>.png``, ``forest.png`` and ``report.html`` (plots embedded) into ``out_dir``.
    An analysis whose columns are missing (no ``pcr``, or no ``timepoint``) is skipped with a
    :class:`~tilscore.errors.TilscoreWarning` and its CSV holds the header only; when neither can
    run, a :class:`~tilscore.errors.TilscoreError` says which columns to add.

    Returns
    -------
    dict
        File kind -> path written.
    """
    df = load_cohort(summary_path, manifest_path, metrics=metrics)
    df.attrs["_checked"] = True
    metrics = list(metrics) if metrics is not None else [m for m in DEFAULT_METRICS if m in df]
    source = df.attrs.get("source")

    def has(cols: Sequence[str]) -> bool:
        return all(c in df and df[c].notna().any() for c in cols)

    can_pair, can_assoc = has(["patient", "timepoint"]), has(["patient", "pcr"])
    if not (can_pair or can_assoc):
        _require(df, ["patient", "timepoint", "pcr"], "the cohort analysis")
    if can_pair:
        paired = paired_change(df, metrics, pre, post, min_pairs=min_pairs)
    else:
        _require_warn(source, "timepoint", "paired change")
        paired = pd.DataFrame(columns=list(PAIRED_COLUMNS))
    if can_assoc:
        association = pcr_association(
            df, metrics, scales=scales, min_n=min_n, min_per_class=min_per_class
        )
    else:
        _require_warn(source, "pcr", "pCR association")
        association = pd.DataFrame(columns=list(ASSOCIATION_COLUMNS))

    out = Path(out_dir)
    files: dict[str, Path] = {}
    files["paired"] = atomic_write(out / "paired.csv", lambda p: paired.to_csv(p, index=False))
    files["association"] = atomic_write(
        out / "association.csv", lambda p: association.to_csv(p, index=False)
    )
    images: dict[str, bytes] = {}
    for metric in metrics:
        if can_pair:
            images[f"slope_{metric}"] = plot_paired(df, metric, pre.lower(), post.lower())
        images[f"box_{metric}"] = plot_box(df, metric, pre.lower(), post.lower())
    if can_assoc and len(association):
        images["forest"] = plot_forest(association)
    for name, data in images.items():
        files[name] = atomic_write(out / f"{name}.png", lambda p, d=data: p.write_bytes(d))
    n_patients = df["patient"].nunique() if "patient" in df else 0
    inputs = {
        "summary": source or "(DataFrame)",
        "manifest": "none"
        if manifest_path is None
        else "(DataFrame)"
        if isinstance(manifest_path, pd.DataFrame)
        else os.fspath(manifest_path),
        "slides": df["slide_id"].nunique(),
        "patients": n_patients,
        "markers": ", ".join(sorted(df["marker"].unique())),
        "compartments": ", ".join(sorted(df["compartment"].unique())),
    }
    if "pcr" in df:
        pcr = df.dropna(subset=["patient"]).groupby("patient")["pcr"].first()
        inputs["patients with pCR"] = f"{int((pcr == 1).sum())} of {int(pcr.notna().sum())}"
    text = cohort_report_html(
        paired,
        association,
        images,
        inputs=inputs,
        method=dict(
            pre=pre, post=post, min_pairs=min_pairs, min_n=min_n, min_per_class=min_per_class
        ),
    )
    files["report"] = atomic_write(out / "report.html", lambda p: p.write_text(text, "utf-8"))
    return files


def summary_lines(
    paired: pd.DataFrame, association: pd.DataFrame, metric: str | None = None
) -> list[str]:
    """Short text lines of the main findings for one metric (default: the first in the tables).

    One line per marker x compartment with the paired change, then one per timepoint with the
    odds ratio of pCR; a value that could not be estimated shows its note.
    """
    tables = [t for t in (paired, association) if len(t)]
    if not tables:
        return []
    metric = metric or str(tables[0]["metric"].iloc[0])
    keys = pd.concat([t.loc[t["metric"] == metric, ["marker", "compartment"]] for t in tables])
    lines = []
    for marker, comp in keys.drop_duplicates().itertuples(index=False):
        head = f"{marker} {comp} {metric}:"
        sel = (paired["marker"] == marker) & (paired["compartment"] == comp)
        rows = paired[sel & (paired["metric"] == metric)]
        if not len(rows):
            lines.append(head)
        for r in rows.itertuples():
            if r.n_pairs == 0:
                lines.append(f"{head} {r.note}")
            else:
                p = f"Wilcoxon p = {r.p_value:.2g}" if pd.notna(r.p_value) else r.note
                lines.append(
                    f"{head} median {r.pre_median:.3g} -> {r.post_median:.3g} "
                    f"({r.n_pairs} pairs, {p})"
                )
        sel = (association["marker"] == marker) & (association["compartment"] == comp)
        for r in association[sel & (association["metric"] == metric)].itertuples():
            what = f"  pCR at {r.timepoint}:"
            if pd.notna(r.odds_ratio_per_10):
                lines.append(
                    f"{what} OR {r.odds_ratio_per_10:.2f} per {r.per} "
                    f"(95% CI {r.ci_low:.2f}-{r.ci_high:.2f}, p = {r.p_value:.2g}, n = {r.n})"
                )
            else:
                lines.append(f"{what} {r.note}")
    return lines


def _require_warn(source: str | None, column: str, what: str) -> None:
    warnings.warn(
        f"{source or 'summary'}: no {column!r} column (or it is empty): the {what} is skipped; "
        "add it to the manifest",
        TilscoreWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------- simulation


def simulate_cohort(
    n_patients: int = 60,
    seed: int = 0,
    *,
    pre_median: float = 6.0,
    post_median: float = 20.0,
    odds_ratio_per_10: float = 2.0,
    pcr_rate: float = 0.35,
    spread: float = 0.6,
    markers: Sequence[str] = ("CD8",),
    compartments: Sequence[str] = ("stromal", "intratumoral"),
    effect_marker: str = "CD8",
    effect_compartment: str = "stromal",
    missing_post: float = 0.0,
    cells_per_mm2: float = 2500.0,
    area_mm2: float = 2.0,
) -> pd.DataFrame:
    """A batch-style summary of a simulated neoadjuvant cohort with a known effect.

    Each patient has a pre- and a post-treatment biopsy per marker. In the effect marker x
    compartment the % positive cells is log-normal with median ``pre_median`` before treatment
    and is multiplied by an independent log-normal fold change with median
    ``post_median / pre_median`` (so the post median is ``post_median``); pCR follows a logistic
    model in the pre-treatment % with the given odds ratio per 10 percentage points and the rate
    ``pcr_rate`` at the pre median. Every other marker x compartment has the same pre
    distribution, no change and no association (null controls). Cell counts are drawn around
    ``cells_per_mm2`` over ``area_mm2``; ``density_per_mm2`` and ``area_fraction_pct`` follow.

    Parameters
    ----------
    n_patients, seed
        Cohort size and random seed.
    pre_median, post_median
        Median % positive before and after treatment in the effect compartment (%).
    odds_ratio_per_10
        True odds ratio of pCR per 10 percentage points of the pre-treatment value.
    pcr_rate
        Probability of pCR at the pre-treatment median.
    spread
        Log-scale SD of the patient values and of the fold change.
    missing_post
        Fraction of patients whose post-treatment biopsies are missing.

    Returns
    -------
    pandas.DataFrame
        Summary rows (``slide_id``, ``path``, ``marker``, ``compartment``, ``area_mm2``,
        ``n_cells``, ``n_positive``, ``density_per_mm2``, ``pct_positive``,
        ``area_fraction_pct``, ``patient``, ``timepoint``, ``pcr``); ``attrs["truth"]`` holds the
        parameters.
    """
    rng = np.random.default_rng(seed)
    patients = [f"P{i + 1:04d}" for i in range(n_patients)]
    beta = math.log(odds_ratio_per_10) / 10.0
    intercept = math.log(pcr_rate / (1 - pcr_rate)) - beta * pre_median
    has_post = rng.random(n_patients) >= missing_post
    pcr = None
    rows = []
    for marker in markers:
        for comp in compartments:
            effect = marker == effect_marker and comp == effect_compartment
            pre = pre_median * np.exp(spread * rng.standard_normal(n_patients))
            fold_median = post_median / pre_median if effect else 1.0
            post = pre * fold_median * np.exp(spread * rng.standard_normal(n_patients))
            if effect:
                p = 1.0 / (1.0 + np.exp(-(intercept + beta * pre)))
                pcr = (rng.random(n_patients) < p).astype(int)
            for tp, pct in (("pre", pre), ("post", post)):
                area = area_mm2 * np.exp(0.2 * rng.standard_normal(n_patients))
                n_cells = rng.poisson(cells_per_mm2 * area).clip(1)
                frac = np.clip(pct, 0, 100) / 100.0
                n_pos = np.round(n_cells * frac).astype(int)
                for i, patient in enumerate(patients):
                    if tp == "post" and not has_post[i]:
                        continue
                    sid = f"{patient}_{tp}_{marker}"
                    rows.append(
                        dict(
                            slide_id=sid,
                            path=f"slides/{sid}.svs",
                            marker=marker,
                            compartment=comp,
                            area_mm2=area[i],
                            n_cells=int(n_cells[i]),
                            n_positive=int(n_pos[i]),
                            density_per_mm2=n_pos[i] / area[i],
                            pct_positive=100.0 * n_pos[i] / n_cells[i],
                            area_fraction_pct=100.0 * frac[i] * 0.45,
                            patient=patient,
                            timepoint=tp,
                        )
                    )
    if pcr is None:
        pcr = (rng.random(n_patients) < pcr_rate).astype(int)
    df = pd.DataFrame(rows)
    df["pcr"] = df["patient"].map(dict(zip(patients, pcr)))
    df.attrs["truth"] = dict(
        pre_median=pre_median,
        post_median=post_median,
        odds_ratio_per_10=odds_ratio_per_10,
        effect=(effect_marker, effect_compartment),
        pcr_rate=pcr_rate,
        spread=spread,
    )
    return df


__all__ = [
    "ASSOCIATION_COLUMNS",
    "DEFAULT_METRICS",
    "METRIC_SCALES",
    "PAIRED_COLUMNS",
    "cohort_report_html",
    "load_cohort",
    "logistic_fit",
    "median_ci",
    "paired_change",
    "pcr_association",
    "plot_box",
    "plot_forest",
    "plot_paired",
    "run_cohort",
    "simulate_cohort",
    "summary_lines",
]
