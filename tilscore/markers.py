"""Marker rules: where each IHC marker's DAB is read, and when a cell counts as positive.

A :class:`MarkerRule` says which compartment of a cell is measured (``"membrane"``: a thin ring
just outside the nucleus; ``"cytoplasm"``: the cell minus its nucleus; ``"nucleus"``; ``"cell"``),
how far the cell reaches around its nucleus (``expansion_um``, limited by neighbouring cells as in
QuPath), the DAB optical-density threshold of a positive cell and of the 1+/2+/3+ bins, and which
nucleus classes may be positive at all ("tumour", "immune", "other"): a CD8 T cell has a small
round lymphocyte nucleus, so a brown tumour cell is never a CD8 T cell.

How the presets' numbers were chosen
------------------------------------
QuPath's positive cell detection (domain.md) starts from a threshold of 0.2 OD on the measured
compartment with bins 0.2 / 0.4 / 0.6. Those numbers fit a nuclear stain read over the whole
nucleus. A membrane ring is thin (about 0.5 µm) and blurred by the optics, so the *mean* DAB OD
over the 1.5-2 µm measurement ring is well below the rendered amplitude. The ring and cytoplasm
values below were measured with :func:`tilscore.cells.measure_cells` on synthetic tiles
(:func:`tilscore.synthetic.synthetic_tile`, 768 px at 0.5 µm/px, ``nest_fraction=0.25``,
randomised stain strength, hue, background, blur and noise, seeds 100-105, truth centres and
classes):

- measured / rendered amplitude of positives: median 0.64 (CD8 ring, 10-90 %: 0.50-0.75),
  0.57 (CD56 ring), 0.66 (CD68 cytoplasm, 0.41-0.79); so the amplitude bins 0.2 / 0.4 / 0.6
  map to about **0.13 / 0.26 / 0.39** measured OD, used for every ring and cytoplasm marker;
- CD8 ring: marker-negative lymphocytes 98th percentile 0.035, weakest (1+) positives 2nd
  percentile 0.105: threshold 0.07 with true centres and classes (CD56 keeps it). With the
  CNN's own nuclei and classes two things change. Strongly stained T cells are solid brown: the
  DAB hides the nucleus and the CNN calls it "other" or "tumour", not "immune" (half the
  positives of the synthetic CD8 slides are drawn so). And tumour or stromal cells touching a
  T cell pick up some of its ring. So the T- and B-cell presets (CD8, CD3, CD4, CD20) accept
  every nucleus class within the lymphocyte nucleus size (at most 110 µm², which keeps most
  tumour nuclei out) and use a ring threshold of **0.15**: on the CD8 example slide (CNN)
  positive F1 0.941 -> 0.984 (recall 0.938 -> 0.994), on the synthetic test field (seed 9101,
  2048 px) 0.962 -> 0.959, % positive within 0.5 points on both. Chosen on synthetic data; on
  the real LYON19 CD3/CD8 patches, measured afterwards for validation only, positive F1 rose
  from 0.19 to 0.48;
- CD8/CD3/CD4/CD20 ring coverage: a cell touching a brown T cell picks up its DAB on one side
  of its ring only, enough to lift the ring mean over 0.15; a stained membrane is brown all
  round. ``dab_ring_coverage`` (fraction of ring pixels above 0.07 OD, the ring threshold with
  true nuclei) of the CNN's cells on synthetic data, ``min_ring_coverage`` swept 0.3-0.8: on the
  CD8 example slide (radius 8 px) positive F1 0.984 (9 FP, 2 FN) -> 0.990 at 0.5, **0.997 at
  0.6** (0 FP, 2 FN), 0.994 at 0.7, 0.993 at 0.8 (5 FN); on the synthetic test field (seed 9101,
  2048 px, radius 4 µm) 0.959 (9 FP) -> 0.988 at 0.4-0.6 (1 FP), 0.992 at 0.7, 0.980 at 0.8.
  The CD56 test field (seed 9103) is unchanged at every value, so CD56 does not use it.
  Validation, afterwards: on LYON19 (CNN) 0.6 lowers positive F1 from 0.476 to 0.451
  (precision 0.365 -> 0.351, recall 0.685 -> 0.630): the real false positives are brown all
  round (coverage does not separate them), while a few thin or patchy real rings fall below
  0.6. The synthetic gain comes from a mechanism that the real data do not show, and the real
  data only lose, so the presets leave the check **off** (``None``); ``min_ring_coverage = 0.6``
  is there to switch on (API, ``--set``, ``[markers.CD8]``) where neighbours' spill is the
  problem;
- CD68 cytoplasm: negative lymphocytes and fibroblasts (which pick up a neighbouring
  macrophage's DAB) 98th percentile 0.064-0.083, 1+ macrophages 2nd percentile 0.091, with
  true nucleus centres. With detected nuclei the cells next to a macrophage take more of its
  cytoplasm: on two synthetic CD68 test fields (seeds 9102, 9202, CNN detector) raising the
  threshold from 0.08 to **0.12** kept positive recall at 1.0 and raised positive precision
  from 0.57-0.68 to 0.69-0.81;
- CD56 surround/ring ratio: NK cells median 0.1 (one of 17 at 0.67, touching other brown
  cells), nerve (Schwann) nuclei and lymphocytes inside nerves 0.68-1.5: ``max_surround_ratio``
  **0.6**.

Nuclear markers (FOXP3, Ki67) keep QuPath's values (0.2 / 0.2, 0.4, 0.6), since a nucleus mean is
read where the stain sits.

CD56 also stains nerve bundles (neuropil) and neuroendocrine tumour cells, which are not NK cells.
The CD56 rule therefore (1) allows only "immune" nuclei, (2) caps the nucleus area at a
lymphocyte's, and (3) rejects a cell whose surroundings are as brown as its ring
(``max_surround_ratio``): a ring is a ring only if the DAB drops outside it; inside a nerve the
DAB is an extended structure and ``dab_od_surround`` (mean DAB OD of a band 1-4 µm outside the
cell) is about as high as the ring.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError

#: compartments a rule can measure, and the cells-table column each one reads
MEASURES = {
    "membrane": "dab_od_membrane",
    "cytoplasm": "dab_od_cytoplasm",
    "nucleus": "dab_od_nucleus",
    "cell": "dab_od_cell",
}
#: nucleus classes used everywhere in tilscore
CELL_CLASSES = ("tumour", "immune", "other")

_FLOAT_FIELDS = (
    "expansion_um",
    "membrane_width_um",
    "threshold_od",
    "min_nucleus_area_um2",
    "max_nucleus_area_um2",
)


def _as_float(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"marker option {name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"marker option {name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"marker option {name} must be finite, got {value!r}")
    if out < 0:
        raise ConfigError(f"marker option {name} must not be negative, got {value!r}")
    return out


@dataclass(frozen=True)
class MarkerRule:
    """How one IHC marker is read and called positive.

    Parameters
    ----------
    name
        Marker name ("CD8").
    measure
        Compartment whose mean DAB OD decides positivity: "membrane", "cytoplasm", "nucleus" or
        "cell".
    expansion_um
        Cell expansion around the nucleus in µm (stops where neighbouring cells meet).
    membrane_width_um
        Width in µm of the ring just outside the nucleus used as "membrane".
    threshold_od
        DAB OD (mean over ``measure``) at or above which a cell is positive.
    bins_od
        Lower bounds (DAB OD) of the 1+, 2+ and 3+ intensity bins, increasing.
    cell_classes
        Nucleus classes that can be positive, e.g. ("immune",) for CD8.
    min_nucleus_area_um2, max_nucleus_area_um2
        Nucleus area range in µm² of cells that can be positive.
    description
        One line on the marker and how its values were chosen.
    max_surround_ratio
        When set, a cell is negative if ``dab_od_surround`` (the band outside the cell) is at
        least this fraction of the measured DAB OD: extended brown structures (nerves) are not
        rings. ``None``: no such check.
    min_ring_coverage
        When set (0-1), a cell is negative if ``dab_ring_coverage`` (the fraction of its
        membrane ring above :data:`tilscore.cells.RING_COVERAGE_OD`) is below it: a stained
        membrane is brown all round, a cell touching a brown neighbour only on one side.
        ``None``: no such check.
    """

    name: str
    measure: str
    expansion_um: float
    membrane_width_um: float
    threshold_od: float
    bins_od: tuple[float, float, float]
    cell_classes: tuple[str, ...]
    min_nucleus_area_um2: float = 10.0
    max_nucleus_area_um2: float = 400.0
    description: str = ""
    max_surround_ratio: float | None = None
    min_ring_coverage: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"marker name must be a non-empty string, got {self.name!r}")
        if self.measure not in MEASURES:
            raise ConfigError(
                f"marker option measure must be one of {sorted(MEASURES)}, got {self.measure!r}"
            )
        for f in _FLOAT_FIELDS:
            object.__setattr__(self, f, _as_float(f, getattr(self, f)))
        object.__setattr__(
            self,
            "max_surround_ratio",
            _as_float("max_surround_ratio", self.max_surround_ratio, allow_none=True),
        )
        coverage = _as_float("min_ring_coverage", self.min_ring_coverage, allow_none=True)
        if coverage is not None and coverage > 1:
            raise ConfigError(
                f"marker option min_ring_coverage must be a fraction in [0, 1], got {coverage!r}"
            )
        object.__setattr__(self, "min_ring_coverage", coverage)
        bins = self.bins_od
        if isinstance(bins, (str, bytes)) or not hasattr(bins, "__len__") or len(bins) != 3:
            raise ConfigError(f"marker option bins_od must be 3 numbers, got {bins!r}")
        bins = tuple(_as_float("bins_od", b) for b in bins)
        if not (bins[0] <= bins[1] <= bins[2]):
            raise ConfigError(f"marker option bins_od must be increasing, got {bins!r}")
        object.__setattr__(self, "bins_od", bins)
        classes = self.cell_classes
        if isinstance(classes, str):
            classes = (classes,)
        classes = tuple(classes)
        bad = [c for c in classes if c not in CELL_CLASSES]
        if bad or not classes:
            raise ConfigError(
                f"marker option cell_classes must be a non-empty subset of {CELL_CLASSES}, "
                f"got {self.cell_classes!r}"
            )
        object.__setattr__(self, "cell_classes", classes)
        if self.min_nucleus_area_um2 > self.max_nucleus_area_um2:
            raise ConfigError(
                "marker option min_nucleus_area_um2 must not exceed max_nucleus_area_um2 "
                f"({self.min_nucleus_area_um2} > {self.max_nucleus_area_um2})"
            )

    @property
    def column(self) -> str:
        """The cells-table column this rule reads (``dab_od_membrane`` ...)."""
        return MEASURES[self.measure]

    def with_overrides(self, **overrides: Any) -> MarkerRule:
        """A copy with some values replaced, validated.

        Raises
        ------
        ConfigError
            An unknown field, or a value that is NaN, infinite, negative or of the wrong kind
            (the message names the field).
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown marker option(s) {unknown}", hint=f"known options: {sorted(names)}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every value (recorded with results)."""
        out = dataclasses.asdict(self)
        out["bins_od"] = list(self.bins_od)
        out["cell_classes"] = list(self.cell_classes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MarkerRule:
        """Inverse of :meth:`to_dict` (validated)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown marker option(s) {unknown}", hint=f"known options: {sorted(names)}"
            )
        return cls(**dict(data))


_RING_BINS = (0.13, 0.26, 0.39)  # measured OD of rendered 0.2 / 0.4 / 0.6 (see above)
_RING_THRESHOLD = 0.07
_LYMPHOCYTE_RING_THRESHOLD = 0.15  # with detected nuclei of any class (see the module notes)
_LYMPHOCYTE_MAX_AREA = 110.0  # µm², a 12 µm round nucleus; tumour nuclei are 80-300 µm²

MARKERS: dict[str, MarkerRule] = {
    "CD8": MarkerRule(
        name="CD8",
        measure="membrane",
        expansion_um=3.0,
        membrane_width_um=1.5,
        threshold_od=_LYMPHOCYTE_RING_THRESHOLD,
        bins_od=_RING_BINS,
        # solid brown T cells hide their nucleus and are classed "other"/"tumour" by the CNN;
        # the lymphocyte size limit keeps tumour nuclei out (see the module notes)
        cell_classes=("immune", "tumour", "other"),
        max_nucleus_area_um2=_LYMPHOCYTE_MAX_AREA,
        description="cytotoxic T cells: DAB ring around (or DAB filling) a lymphocyte-size cell",
    ),
    "CD56": MarkerRule(
        name="CD56",
        measure="membrane",
        expansion_um=3.5,
        membrane_width_um=2.0,
        threshold_od=_RING_THRESHOLD,
        bins_od=_RING_BINS,
        cell_classes=("immune",),
        max_nucleus_area_um2=_LYMPHOCYTE_MAX_AREA,
        max_surround_ratio=0.6,
        description=(
            "NK cells: DAB ring around a lymphocyte-size nucleus; nerves (brown surroundings) "
            "and tumour cells are excluded"
        ),
    ),
    "CD68": MarkerRule(
        name="CD68",
        measure="cytoplasm",
        expansion_um=7.0,
        membrane_width_um=1.5,
        threshold_od=0.12,
        bins_od=_RING_BINS,
        cell_classes=("immune", "other"),
        # macrophage nuclei are at least ~6 µm across; smaller nuclei (fibroblasts, small
        # lymphocytes) touching a macrophage pick up its DAB in their expansion and were the
        # false positives on the synthetic CD68 slides (stromal density +10 % -> +1.4 %)
        min_nucleus_area_um2=30.0,
        description="macrophages: granular DAB in abundant cytoplasm around a nucleus of at least "
        "30 µm²; never tumour cells",
    ),
    "FOXP3": MarkerRule(
        name="FOXP3",
        measure="nucleus",
        expansion_um=3.0,
        membrane_width_um=1.5,
        threshold_od=0.2,
        bins_od=(0.2, 0.4, 0.6),
        cell_classes=("immune",),
        max_nucleus_area_um2=_LYMPHOCYTE_MAX_AREA,
        description="regulatory T cells: nuclear DAB (QuPath's nucleus thresholds)",
    ),
    "KI67": MarkerRule(
        name="Ki67",
        measure="nucleus",
        expansion_um=5.0,
        membrane_width_um=1.5,
        threshold_od=0.2,
        bins_od=(0.2, 0.4, 0.6),
        cell_classes=CELL_CLASSES,
        description="proliferating cells of any class: nuclear DAB (QuPath's nucleus thresholds)",
    ),
}


# T- and B-cell membrane markers read exactly like CD8 (a ring around a lymphocyte nucleus)
for _name, _cells in (("CD3", "T cells"), ("CD4", "helper T cells"), ("CD20", "B cells")):
    MARKERS[_name] = replace(
        MARKERS["CD8"],
        name=_name,
        description=f"{_cells}: membranous DAB around a lymphocyte-size nucleus (as CD8)",
    )


def _known() -> list[str]:
    return [r.name for r in MARKERS.values()]


def get_marker(name: str | MarkerRule, **overrides: Any) -> MarkerRule:
    """The preset rule for a marker name (case-insensitive), with optional overrides.

    Parameters
    ----------
    name
        A marker name ("CD8", "cd68", "Ki67") or a :class:`MarkerRule` (returned, overridden).
    **overrides
        :class:`MarkerRule` fields to replace (validated).

    Raises
    ------
    ConfigError
        Unknown marker (the message lists the known names) or invalid override.
    """
    if isinstance(name, MarkerRule):
        rule = name
    else:
        if not isinstance(name, str):
            raise ConfigError(f"marker must be a name or a MarkerRule, got {name!r}")
        rule = MARKERS.get(name.strip().upper())
        if rule is None:
            raise ConfigError(
                f"unknown marker {name!r}",
                hint=f"known markers: {', '.join(_known())}; or load a TOML config",
            )
    return rule.with_overrides(**overrides) if overrides else rule


def _load_toml(path: str | os.PathLike) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "reading TOML marker configs needs Python >= 3.11",
                path=path,
                hint="upgrade Python or `pip install tomli`",
            ) from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path, hint="check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=path) from None
    except RecursionError:
        raise ConfigError(
            "the TOML is nested too deeply to read (a crafted or broken file?)", path=path
        ) from None


def load_marker_config(path: str | os.PathLike) -> dict[str, MarkerRule]:
    """Marker rules from a TOML file: presets with overrides, and new markers.

    ``[markers.CD8]`` with ``threshold_od = 0.25`` overrides the CD8 preset's threshold; a table
    whose name is not a preset defines a new marker and must give every field without a
    default (``measure``, ``expansion_um``, ``membrane_width_um``, ``threshold_od``,
    ``bins_od``, ``cell_classes``).

    Parameters
    ----------
    path
        The TOML file.

    Returns
    -------
    dict
        Upper-case marker name -> :class:`MarkerRule`, presets included (overridden where the
        file says so).

    Raises
    ------
    ConfigError
        Unreadable file, invalid TOML, unknown field or invalid value (the message names the
        file and the marker).
    """
    data = _load_toml(path)
    unknown = sorted(set(data) - {"markers"})
    if unknown:
        raise ConfigError(
            f"unknown top-level table(s) {unknown}", path=path, hint="use [markers.NAME] tables"
        )
    tables = data.get("markers", {})
    if not isinstance(tables, dict):
        raise ConfigError("`markers` must be a table of tables", path=path)
    out = dict(MARKERS)
    for name, values in tables.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[markers.{name}] must be a table", path=path)
        try:
            key = name.strip().upper()
            if key in MARKERS:
                out[key] = MARKERS[key].with_overrides(**values)
            else:
                out[key] = MarkerRule.from_dict({"name": name, **values})
        except ConfigError as exc:
            raise ConfigError(f"[markers.{name}]: {exc}", path=path) from None
        except TypeError as exc:  # a missing required field of a new marker
            raise ConfigError(f"[markers.{name}]: {exc}", path=path) from None
    return out


def classify_cells(cells: pd.DataFrame, rule: MarkerRule) -> pd.DataFrame:
    """Set ``positive`` and ``intensity_bin`` of every cell by a marker rule (vectorised).

    A cell is positive when its ``cell_class`` is in ``rule.cell_classes``, its nucleus area is
    within the rule's range, its mean DAB OD over ``rule.measure`` is at least
    ``rule.threshold_od`` and, where ``rule.max_surround_ratio`` is set and the table has
    ``dab_od_surround``, its surroundings are clearly paler than the measured compartment and,
    where ``rule.min_ring_coverage`` is set and the table has ``dab_ring_coverage``, enough of
    its membrane ring is brown.
    ``intensity_bin`` is 1/2/3 for positives by ``rule.bins_od`` (at least 1), 0 otherwise.

    Parameters
    ----------
    cells
        A cells table with ``cell_class``, ``nucleus_area_um2`` (µm²) and the measured column.
    rule
        The marker rule.

    Returns
    -------
    pandas.DataFrame
        A copy of ``cells`` with ``positive`` (bool) and ``intensity_bin`` (int8).
    """
    rule = get_marker(rule)
    col = rule.column
    missing = [c for c in (col, "cell_class") if c not in cells.columns]
    if missing:
        raise ConfigError(
            f"cells table lacks column(s) {missing} needed by marker {rule.name}",
            hint="measure the cells first (tilscore.cells.measure_cells)",
        )
    out = cells.copy()
    od = out[col].to_numpy(np.float64)
    ok = out["cell_class"].isin(rule.cell_classes).to_numpy(dtype=bool, copy=True)
    ok &= np.nan_to_num(od, nan=-np.inf) >= rule.threshold_od
    if "nucleus_area_um2" in out.columns:
        area = out["nucleus_area_um2"].to_numpy(np.float64)
        ok &= (area >= rule.min_nucleus_area_um2) & (area <= rule.max_nucleus_area_um2)
    if rule.max_surround_ratio is not None and "dab_od_surround" in out.columns:
        surround = np.nan_to_num(out["dab_od_surround"].to_numpy(np.float64), nan=0.0)
        ok &= surround < rule.max_surround_ratio * od
    if rule.min_ring_coverage is not None and "dab_ring_coverage" in out.columns:
        coverage = np.nan_to_num(out["dab_ring_coverage"].to_numpy(np.float64), nan=0.0)
        ok &= coverage >= rule.min_ring_coverage
    bins = np.clip(np.digitize(od, rule.bins_od), 1, 3)
    out["positive"] = ok
    out["intensity_bin"] = np.where(ok, bins, 0).astype(np.int8)
    return out
