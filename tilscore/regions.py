"""Regions: classified polygons in level-0 px, from annotations or automatic segmentation.

A :class:`RegionSet` holds :class:`Region` objects, each a polygon (or multipolygon) with one of
:data:`REGION_CLASSES`:

===========  ===================================================================================
tumour       tumour nests (the intratumoral compartment)
stroma       tumour-associated stroma
tumour_bed   the tumour bed: nests and the stroma between them
margin       an invasive-margin band drawn by hand (otherwise it is built around the bed)
exclude      necrosis, artefact, normal tissue, DCIS, pen...: neither cells nor area count
roi          the region to score (QuPath "Region*", an unclassified annotation, "Tissue")
other        any other class (kept with its name, not used for compartments)
===========  ===================================================================================

Readers: QuPath GeoJSON (:meth:`RegionSet.from_geojson`), napari Shapes data
(:meth:`RegionSet.from_shapes`), label or binary mask images (:meth:`RegionSet.from_mask`);
:func:`load_regions` picks by type or suffix. Writer: QuPath-importable GeoJSON
(:meth:`RegionSet.to_geojson`, :meth:`RegionSet.save`).

:func:`build_compartments` turns regions (or the automatic ones from :func:`auto_regions`) into the
compartments a study reports: intratumoral, stromal, invasive margin, tumour bed and tissue.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RegionError, TilscoreWarning

__all__ = [
    "COMPARTMENTS",
    "DEFAULT_CLASS_MAP",
    "REGION_CLASSES",
    "Compartments",
    "Region",
    "RegionSet",
    "auto_regions",
    "build_compartments",
    "load_regions",
]

REGION_CLASSES = ("tumour", "stroma", "tumour_bed", "margin", "exclude", "roi", "other")
#: Reported compartments, in report order.
COMPARTMENTS = ("intratumoral", "stromal", "invasive_margin", "tumour_bed", "tissue")

#: Annotation class name (case-insensitive; ``*`` and ``?`` wildcards) -> region class.
DEFAULT_CLASS_MAP: dict[str, str] = {
    "tumor": "tumour",
    "tumour": "tumour",
    "tumor nest*": "tumour",
    "tumour nest*": "tumour",
    "intratumoral": "tumour",
    "invasive tumor": "tumour",
    "invasive carcinoma": "tumour",
    "carcinoma": "tumour",
    "stroma": "stroma",
    "tumor stroma": "stroma",
    "tumour stroma": "stroma",
    "stromal": "stroma",
    "tumor bed": "tumour_bed",
    "tumour bed": "tumour_bed",
    "tumor area": "tumour_bed",
    "tumour area": "tumour_bed",
    "tumor region": "tumour_bed",
    "margin": "margin",
    "invasive margin": "margin",
    "ignore*": "exclude",
    "exclude*": "exclude",
    "excluded": "exclude",
    "necrosis": "exclude",
    "other": "exclude",
    "artefact*": "exclude",
    "artifact*": "exclude",
    "normal*": "exclude",
    "dcis": "exclude",
    "in situ*": "exclude",
    "pen*": "exclude",
    "fold*": "exclude",
    "blood": "exclude",
    "h?emorrhage": "exclude",
    "background": "exclude",
    "region*": "roi",
    "roi": "roi",
    "tissue": "roi",
    "region of interest": "roi",
    "": "roi",  # an unclassified annotation marks the area to analyse
    "nerve": "other",
}
#: Region class -> (QuPath class name, colour) written to GeoJSON.
QUPATH_CLASSES: dict[str, tuple[str, list[int]]] = {
    "tumour": ("Tumor", [200, 0, 0]),
    "stroma": ("Stroma", [150, 200, 150]),
    "tumour_bed": ("Tumor bed", [128, 0, 128]),
    "margin": ("Margin", [255, 200, 0]),
    "exclude": ("Ignore*", [180, 180, 180]),
    "roi": ("Region*", [0, 0, 180]),
    "other": ("Other", [255, 200, 0]),
}


@dataclass(frozen=True)
class Region:
    """One classified region.

    Attributes
    ----------
    cls
        One of :data:`REGION_CLASSES`.
    geometry
        shapely Polygon or MultiPolygon, level-0 px (x = column), valid.
    name
        The annotation's class name as found in the file (or the QuPath name of ``cls``).
    """

    cls: str
    geometry: Any
    name: str = ""


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a geometry as a valid (Multi)Polygon (possibly empty)."""
    import shapely

    if geom is None or geom.is_empty:
        return shapely.MultiPolygon()
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    if geom.geom_type == "GeometryCollection":
        parts = [_polygonal(g) for g in geom.geoms]
        parts = [p for p in parts if not p.is_empty]
        return shapely.union_all(parts) if parts else shapely.MultiPolygon()
    return shapely.MultiPolygon()


def _repair(geom: Any, what: str, path: str | None) -> Any:
    import shapely

    if geom.is_valid:
        return geom
    reason = shapely.is_valid_reason(geom)
    fixed = _polygonal(shapely.make_valid(geom))
    warnings.warn(
        f"{path + ': ' if path else ''}{what} was not a valid polygon ({reason}); repaired "
        f"(area {geom.area:.0f} -> {fixed.area:.0f} px²)",
        TilscoreWarning,
        stacklevel=4,
    )
    return fixed


def classify_name(name: str, class_map: Mapping[str, str] | None = None) -> str | None:
    """Region class of an annotation class name (user map first, then the defaults)."""
    key = (name or "").strip().lower()
    for table in (class_map or {}, DEFAULT_CLASS_MAP):
        for pattern, cls in table.items():
            if fnmatch.fnmatchcase(key, pattern.strip().lower()):
                if cls not in REGION_CLASSES:
                    raise RegionError(
                        f"class_map maps {pattern!r} to {cls!r}",
                        hint=f"map names to one of {', '.join(REGION_CLASSES)}",
                    )
                return cls
    return None


def _qupath_class_name(props: Mapping[str, Any]) -> str:
    """Class name of a QuPath feature (0.4+ dict, <= 0.3 dict with colorRGB, or a string)."""
    c = props.get("classification")
    if isinstance(c, Mapping):
        name = c.get("name")
        if name is None and isinstance(c.get("names"), list):  # derived classes
            name = ": ".join(str(n) for n in c["names"])
        return str(name or "")
    if isinstance(c, str):
        return c
    return ""


@dataclass
class RegionSet:
    """Classified regions of one slide, level-0 px.

    Attributes
    ----------
    regions
        The regions, in file order.
    source
        "annotation", "automatic", "napari", "mask" or the file they came from.
    """

    regions: list[Region] = field(default_factory=list)
    source: str = "annotation"

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self):
        return iter(self.regions)

    @property
    def classes(self) -> list[str]:
        """The classes present, in :data:`REGION_CLASSES` order."""
        have = {r.cls for r in self.regions}
        return [c for c in REGION_CLASSES if c in have]

    def geometry(self, cls: str) -> Any:
        """Union of the regions of a class (an empty MultiPolygon when there are none)."""
        import shapely

        if cls not in REGION_CLASSES:
            raise RegionError(f"unknown region class {cls!r}", hint=f"one of {REGION_CLASSES}")
        parts = [r.geometry for r in self.regions if r.cls == cls]
        if not parts:
            return shapely.MultiPolygon()
        return _polygonal(shapely.make_valid(shapely.union_all(parts)))

    def has(self, cls: str) -> bool:
        return any(r.cls == cls for r in self.regions)

    # -- GeoJSON ----------------------------------------------------------------------------

    @classmethod
    def from_geojson(
        cls,
        source: str | os.PathLike | Mapping[str, Any] | Sequence[Any],
        class_map: Mapping[str, str] | None = None,
    ) -> RegionSet:
        """Regions from QuPath GeoJSON: a file, or the parsed FeatureCollection / feature list.

        Accepts a FeatureCollection, a bare array of features (QuPath's default export), or one
        Feature; Polygon, MultiPolygon and GeometryCollection geometries (holes kept);
        ``objectType`` annotation (detections and cells are skipped with a warning). Invalid
        polygons are repaired with a warning; unknown class names are kept as class "other"
        and listed in a warning.

        Raises
        ------
        RegionError
            Unreadable or empty file, not GeoJSON, or no polygon at all.
        """
        import shapely

        path = None
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise RegionError("regions file not found", path=path) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise RegionError(f"cannot read the regions file: {exc}", path=path) from None
            if not text.strip():
                raise RegionError(
                    "the regions file is empty", path=path, hint="export it again from QuPath"
                )
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RegionError(
                    f"not valid JSON ({exc.msg} at line {exc.lineno})",
                    path=path,
                    hint="regions must be GeoJSON (QuPath: File > Export objects as GeoJSON)",
                ) from None
            except RecursionError:
                raise RegionError(
                    "the JSON is nested too deeply to read (a crafted or broken file?)",
                    path=path,
                    hint="regions must be GeoJSON (QuPath: File > Export objects as GeoJSON)",
                ) from None
        else:
            data = source
        if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
            features = data.get("features")
        elif isinstance(data, Mapping) and data.get("type") == "Feature":
            features = [data]
        elif isinstance(data, list):
            features = data
        else:
            raise RegionError(
                "not a GeoJSON FeatureCollection, Feature or feature array",
                path=path,
                hint="export the annotations from QuPath with File > Export objects as GeoJSON",
            )
        if not isinstance(features, list):
            raise RegionError("the FeatureCollection has no 'features' array", path=path)
        regions: list[Region] = []
        unknown: dict[str, int] = {}
        skipped: dict[str, int] = {}
        for i, feat in enumerate(features):
            if not isinstance(feat, Mapping) or not isinstance(feat.get("geometry"), Mapping):
                raise RegionError(f"feature {i} has no geometry", path=path)
            props = feat.get("properties") or {}
            otype = str(props.get("objectType", "annotation"))
            if otype not in ("annotation", "tile", "rootobject"):
                skipped[otype] = skipped.get(otype, 0) + 1
                continue
            try:
                geom = shapely.geometry.shape(feat["geometry"])
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise RegionError(f"feature {i}: unreadable geometry ({exc})", path=path) from None
            if not np.isfinite(shapely.get_coordinates(geom)).all():  # NaN/Infinity (issue 17)
                raise RegionError(
                    f"feature {i} has a coordinate that is not a finite number",
                    path=path,
                    hint="Fix or remove the feature (NaN and Infinity are not coordinates)",
                )
            if geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
                skipped[geom.geom_type] = skipped.get(geom.geom_type, 0) + 1
                continue
            name = _qupath_class_name(props)
            rcls = props.get("tilscore_class")
            if rcls not in REGION_CLASSES:
                rcls = classify_name(name, class_map)
            if rcls is None:
                unknown[name] = unknown.get(name, 0) + 1
                rcls = "other"
            geom = _repair(geom, f"feature {i} ({name or 'unclassified'})", path)
            geom = _polygonal(geom)
            if geom.is_empty:
                continue
            regions.append(Region(rcls, geom, name))
        if skipped:
            warnings.warn(
                f"{path + ': ' if path else ''}skipped objects that are not area annotations: "
                + ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())),
                TilscoreWarning,
                stacklevel=2,
            )
        if unknown:
            warnings.warn(
                f"{path + ': ' if path else ''}unknown region class name(s) "
                + ", ".join(f"{k!r} ({n})" for k, n in sorted(unknown.items()))
                + " kept as 'other' and not used for compartments; map them with "
                '[regions] class_map in the config (e.g. "My tumour" = "tumour")',
                TilscoreWarning,
                stacklevel=2,
            )
        if not regions:
            raise RegionError(
                "no polygon annotations found",
                path=path,
                hint="draw area annotations (not points or lines) and export them as GeoJSON",
            )
        return cls(regions, source=path or "annotation")

    def to_geojson(self) -> dict[str, Any]:
        """A FeatureCollection of QuPath annotations (File > Import objects reads it back)."""
        import shapely

        features = []
        for i, r in enumerate(self.regions):
            qname, colour = QUPATH_CLASSES[r.cls]
            name = r.name if (r.name and classify_name(r.name) == r.cls) else qname
            if r.cls == "other" and r.name:
                name = r.name
            features.append(
                {
                    "type": "Feature",
                    "id": f"tilscore-region-{i}",
                    "geometry": json.loads(shapely.to_geojson(r.geometry)),
                    "properties": {
                        "objectType": "annotation",
                        "name": name,
                        "classification": {"name": name, "color": colour},
                        "tilscore_class": r.cls,
                        "isLocked": False,
                    },
                }
            )
        return {"type": "FeatureCollection", "features": features}

    def save(self, path: str | os.PathLike) -> Path:
        """Write QuPath GeoJSON (atomically)."""
        from .export import atomic_write

        text = json.dumps(self.to_geojson())
        return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))

    # -- napari -----------------------------------------------------------------------------

    @classmethod
    def from_shapes(
        cls,
        data: Sequence[np.ndarray],
        classes: str | Sequence[str],
        shape_types: str | Sequence[str] | None = None,
    ) -> RegionSet:
        """Regions from napari Shapes layer data: (N, 2) vertex arrays in (row = y, col = x) order.

        The vertices must be in level-0 px (a Shapes layer with the image layer's scale holds
        them so). ``classes``: one region class for all shapes or one per shape. Rectangles,
        polygons and ellipses become polygons (an ellipse from its 4 bounding-box corners);
        lines and paths are skipped with a warning.
        """
        import shapely

        n = len(data)
        cls_list = [classes] * n if isinstance(classes, str) else list(classes)
        types = (
            ["polygon"] * n
            if shape_types is None
            else ([shape_types] * n if isinstance(shape_types, str) else list(shape_types))
        )
        if len(cls_list) != n or len(types) != n:
            raise RegionError(f"{n} shapes but {len(cls_list)} classes / {len(types)} types")
        regions = []
        for verts, c, t in zip(data, cls_list, types):
            rcls = c if c in REGION_CLASSES else classify_name(c)
            if rcls is None:
                raise RegionError(
                    f"unknown region class {c!r} for a shape", hint=f"one of {REGION_CLASSES}"
                )
            v = np.asarray(verts, float)
            if v.ndim != 2 or v.shape[1] < 2:
                raise RegionError(f"shape vertices must be (N, 2), got {v.shape}")
            xy = v[:, -2:][:, ::-1]  # (y, x) -> (x, y); extra leading dims (z, t) dropped
            if t in ("line", "path"):
                warnings.warn(f"a {t} shape has no area; skipped", TilscoreWarning, stacklevel=2)
                continue
            if t == "ellipse":
                (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
                geom = shapely.affinity.scale(
                    shapely.Point(0, 0).buffer(1.0, quad_segs=16),
                    (x1 - x0) / 2,
                    (y1 - y0) / 2,
                    origin=(0, 0),
                )
                geom = shapely.affinity.translate(geom, (x0 + x1) / 2, (y0 + y1) / 2)
            else:
                if len(xy) < 3:
                    continue
                geom = shapely.Polygon(xy)
            geom = _polygonal(_repair(geom, f"a {rcls} shape", None))
            if not geom.is_empty:
                regions.append(Region(rcls, geom, QUPATH_CLASSES[rcls][0]))
        return cls(regions, source="napari")

    def to_shapes(self) -> dict[str, list[np.ndarray]]:
        """Region class -> list of (N, 2) exterior rings in napari (y, x) order, level-0 px.

        Holes cannot be drawn in a napari polygon; they are dropped here (the RegionSet and its
        GeoJSON keep them).
        """
        out: dict[str, list[np.ndarray]] = {}
        for r in self.regions:
            polys = r.geometry.geoms if r.geometry.geom_type == "MultiPolygon" else [r.geometry]
            for p in polys:
                xy = np.asarray(p.exterior.coords)[:-1]
                out.setdefault(r.cls, []).append(xy[:, ::-1].copy())
        return out

    # -- masks ------------------------------------------------------------------------------

    @classmethod
    def from_mask(
        cls,
        mask: np.ndarray | str | os.PathLike,
        downsample: float = 1.0,
        labels: Mapping[int, str] | str = "roi",
    ) -> RegionSet:
        """Regions from a label or binary mask image.

        Parameters
        ----------
        mask
            (H, W) integer or bool array, or an image file (PNG, TIFF...); an RGB(A) image is
            read as binary (any channel > 0).
        downsample
            Level-0 px per mask pixel (e.g. 16 for a mask drawn on a 16x downsampled overview;
            the slide's µm/px divided by the mask's gives it).
        labels
            Label value -> region class, or one class for every non-zero pixel.
        """
        from .tissue import TissueMask

        path = None
        if isinstance(mask, (str, os.PathLike)):
            path = os.fspath(mask)
            mask = _read_mask(path)
        m = np.asarray(mask)
        if m.ndim == 3:
            m = (m[..., :3] > 0).any(-1)
        if m.ndim != 2:
            raise RegionError(f"a region mask must be 2-D, got shape {m.shape}", path=path)
        if not (math.isfinite(downsample) and downsample > 0):
            raise RegionError(f"downsample must be positive, got {downsample}", path=path)
        if isinstance(labels, str):
            labels = {v: labels for v in np.unique(m) if v}
        regions = []
        for value, rcls in labels.items():
            if rcls not in REGION_CLASSES:
                raise RegionError(f"label {value} maps to unknown class {rcls!r}", path=path)
            sel = m == value
            if not sel.any():
                continue
            geom = TissueMask(sel, mpp=1.0, downsample=float(downsample)).polygons()
            if not geom.is_empty:
                regions.append(Region(rcls, geom, QUPATH_CLASSES[rcls][0]))
        if not regions:
            raise RegionError(
                "the mask has no labelled pixels", path=path, hint="check the labels mapping"
            )
        return cls(regions, source=path or "mask")

    # -- geometry ---------------------------------------------------------------------------

    def clip(self, width: float, height: float, path: str | None = None) -> RegionSet:
        """Regions clipped to the slide (0, 0, width, height), with a warning when any was cut.

        Raises
        ------
        RegionError
            No region overlaps the slide at all (most often: another coordinate scale).
        """
        import shapely

        box = shapely.box(0, 0, width, height)
        out, cut = [], 0
        for r in self.regions:
            if shapely.covered_by(r.geometry, box):
                out.append(r)
                continue
            g = _polygonal(r.geometry.intersection(box))
            cut += 1
            if not g.is_empty:
                out.append(Region(r.cls, g, r.name))
        if not out:
            x0, y0, x1, y1 = shapely.union_all([r.geometry for r in self.regions]).bounds
            ratio = max(x1 / width, y1 / height)
            raise RegionError(
                f"no region overlaps the slide: regions span ({x0:.0f}, {y0:.0f}) - "
                f"({x1:.0f}, {y1:.0f}) px, the slide is {width:.0f} x {height:.0f} px",
                path=path,
                hint=(
                    "regions must be in level-0 pixels; these look "
                    f"{ratio:.1f}x too large: were they drawn on another slide or scale?"
                    if ratio > 1
                    else "regions must be in level-0 pixels of this slide"
                ),
            )
        if cut:
            warnings.warn(
                f"{path + ': ' if path else ''}{cut} region(s) reach outside the slide "
                f"({width:.0f} x {height:.0f} px) and were clipped",
                TilscoreWarning,
                stacklevel=2,
            )
        return RegionSet(out, self.source)

    def scaled(self, factor: float) -> RegionSet:
        """Every region scaled by ``factor`` about the origin (e.g. from overview to level 0)."""
        import shapely

        return RegionSet(
            [
                Region(
                    r.cls, shapely.affinity.scale(r.geometry, factor, factor, origin=(0, 0)), r.name
                )
                for r in self.regions
            ],
            self.source,
        )


def _read_mask(path: str) -> np.ndarray:
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            return tifffile.imread(path)
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    except FileNotFoundError:
        raise RegionError("mask image not found", path=path) from None
    except Exception as exc:  # PIL/tifffile raise many kinds on a bad file
        raise RegionError(f"cannot read the mask image: {exc}", path=path) from None


def load_regions(
    source: Any,
    *,
    class_map: Mapping[str, str] | None = None,
    slide: Any = None,
    mask_downsample: float | None = None,
    mask_labels: Mapping[int, str] | str = "roi",
) -> RegionSet:
    """Regions from a GeoJSON file or object, a mask image, a :class:`RegionSet` or shapely.

    Parameters
    ----------
    source
        A .geojson/.json path, parsed GeoJSON, a mask image path (.png, .tif...; scaled by
        ``mask_downsample`` or, with ``slide``, by the ratio of the slide's width to the mask's),
        a RegionSet, or a mapping class -> shapely geometry.
    class_map
        Extra class-name mapping (wins over :data:`DEFAULT_CLASS_MAP`).
    slide
        When given, regions are clipped to it (with a warning) and a mask is scaled to it.
    """
    import shapely

    if isinstance(source, RegionSet):
        regions = source
    elif (
        isinstance(source, Mapping)
        and source
        and all(isinstance(v, shapely.Geometry) for v in source.values())
    ):
        regions = RegionSet(
            [
                Region(_check_class(k), _polygonal(v), QUPATH_CLASSES[_check_class(k)][0])
                for k, v in source.items()
            ],
            "annotation",
        )
    elif isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in (
        ".png",
        ".tif",
        ".tiff",
        ".jpg",
        ".jpeg",
        ".bmp",
    ):
        path = os.fspath(source)
        m = _read_mask(path)
        ds = mask_downsample
        if ds is None:
            if slide is None:
                raise RegionError(
                    "a mask needs its scale", path=path, hint="pass mask_downsample= or slide="
                )
            ds = slide.dimensions[0] / m.shape[1]
        regions = RegionSet.from_mask(m, ds, mask_labels)
        regions.source = path
    else:
        regions = RegionSet.from_geojson(source, class_map)
    if slide is not None:
        regions = regions.clip(*slide.dimensions, path=regions.source)
    return regions


def _check_class(name: str) -> str:
    if name not in REGION_CLASSES:
        raise RegionError(f"unknown region class {name!r}", hint=f"one of {REGION_CLASSES}")
    return name


# -- automatic segmentation --------------------------------------------------------------------


def auto_regions(
    cells: Any,
    width: int,
    height: int,
    mpp: float,
    *,
    tissue: Any = None,
    grid_um: float = 8.0,
    sigma_um: float = 16.0,
    min_tumour_fraction: float = 0.5,
    min_density_per_mm2: float = 1500.0,
    min_nest_area_um2: float = 2000.0,
    bed_margin_um: float = 300.0,
) -> RegionSet:
    """Tumour nests and tumour bed from the detector's nucleus classes.

    Nests are where tumour-class nuclei are dense (smoothed density at least
    ``min_density_per_mm2``) and dominate (at least ``min_tumour_fraction`` of all nuclei). Nests
    closer than twice ``bed_margin_um`` form a group, and the bed is each group's convex hull
    within tissue (the stroma between and around the nests of one tumour focus).

    Parameters
    ----------
    cells
        Cells table (x, y level-0 px, cell_class).
    width, height, mpp
        Slide size (level-0 px) and µm/px.
    tissue
        Optional shapely geometry of the tissue (level-0 px); nests and bed stay inside it.
    """
    import cv2
    import shapely

    from .tissue import TissueMask, _fill_small_holes

    ds = grid_um / mpp  # level-0 px per grid cell
    gw, gh = max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))
    x = np.asarray(cells["x"], float) / ds
    y = np.asarray(cells["y"], float) / ds
    is_t = np.asarray(cells["cell_class"]) == "tumour"
    # cell counts per grid cell (as histogram2d with unit bins: [i, i + 1), the last one
    # closed), counted straight into float32 grids: the grid of a large slide has tens of
    # millions of cells, and float64 histograms of it would double the peak memory
    inside = (x >= 0) & (x <= gw) & (y >= 0) & (y <= gh)
    xi = np.minimum(x[inside].astype(np.intp), gw - 1)
    yi = np.minimum(y[inside].astype(np.intp), gh - 1)
    is_t = is_t[inside]
    all_n = np.zeros((gh, gw), np.float32)
    tum_n = np.zeros((gh, gw), np.float32)
    np.add.at(all_n, (yi, xi), 1.0)
    np.add.at(tum_n, (yi[is_t], xi[is_t]), 1.0)
    s = sigma_um / grid_um
    # the grids are smoothed and divided in place: a 16-gigapixel slide's grid has 16 M cells,
    # 63 MB per float32 copy
    if s > 0:
        cv2.GaussianBlur(all_n, (0, 0), s, dst=all_n)
        cv2.GaussianBlur(tum_n, (0, 0), s, dst=tum_n)
    per_mm2 = 1e6 / (grid_um * grid_um)
    nest = tum_n * per_mm2 >= min_density_per_mm2
    some = all_n > 0
    with np.errstate(invalid="ignore", divide="ignore"):  # tum_n becomes the tumour fraction
        np.divide(tum_n, all_n, out=tum_n, where=some)
    tum_n[~some] = 0.0
    nest &= tum_n >= min_tumour_fraction
    del all_n, tum_n, some
    min_px = min_nest_area_um2 / (grid_um * grid_um)
    # nests: 4-connected components of at least min_px grid cells, holes filled
    _, lab, stats, _ = cv2.connectedComponentsWithStats(nest.view(np.uint8), connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # the background
    nest = _fill_small_holes(keep[lab], math.inf)
    del lab
    r = max(1, round(bed_margin_um / grid_um))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    padded = np.pad(nest.astype(np.uint8), r + 1)
    bed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)[r + 1 : -r - 1, r + 1 : -r - 1] > 0
    bed = _fill_small_holes(bed, math.inf)
    nests_g = TissueMask(nest, mpp=grid_um, downsample=ds).polygons(simplify_px=0.5)
    bed_g = TissueMask(bed, mpp=grid_um, downsample=ds).polygons(simplify_px=0.5)
    # each group of nests (closer than twice bed_margin_um) spans its convex hull: the stroma
    # between and around a group's nests belongs to its bed, not only the gaps the closing fills
    if not bed_g.is_empty:
        groups = bed_g.geoms if bed_g.geom_type == "MultiPolygon" else [bed_g]
        bed_g = _polygonal(shapely.union_all([shapely.convex_hull(grp) for grp in groups]))
    if tissue is not None and not tissue.is_empty:
        nests_g = _polygonal(shapely.intersection(nests_g, tissue))
        bed_g = _polygonal(shapely.intersection(bed_g, tissue))
    regions = []
    if not bed_g.is_empty:
        regions.append(Region("tumour_bed", bed_g, "Tumor bed"))
    if not nests_g.is_empty:
        regions.append(Region("tumour", nests_g, "Tumor"))
    return RegionSet(regions, source="automatic")


# -- compartments ------------------------------------------------------------------------------


@dataclass
class Compartments:
    """The reported compartments of a slide (level-0 px geometries) and where each came from.

    Attributes
    ----------
    geometries
        Compartment name (:data:`COMPARTMENTS`) -> shapely geometry (may be empty).
    sources
        Compartment name -> "annotation", "automatic", "tissue mask" or a mix ("annotation +
        automatic").
    excluded
        The excluded area (removed from every compartment).
    """

    geometries: dict[str, Any]
    sources: dict[str, str]
    excluded: Any
    excluded_areas: dict[str, float] = field(default_factory=dict)

    def area_mm2(self, name: str, mpp_x: float, mpp_y: float | None = None) -> float:
        return float(self.geometries[name].area) * mpp_x * (mpp_y or mpp_x) / 1e6

    def excluded_mm2(self, name: str, mpp_x: float, mpp_y: float | None = None) -> float:
        """Area (mm²) that exclusions and artefacts took from compartment ``name``."""
        return self.excluded_areas.get(name, 0.0) * mpp_x * (mpp_y or mpp_x) / 1e6

    def assign(self, x: Iterable[float], y: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
        """Each point's compartment label and whether it lies in the invasive margin.

        Labels: "intratumoral", "stromal", "tissue" (tissue outside the bed), "excluded" and
        "outside" (not in the scored tissue). Vectorised (prepared geometries).
        """
        import shapely

        x = np.asarray(x, float)
        y = np.asarray(y, float)
        label = np.full(len(x), "outside", dtype=object)
        for name, lab in (
            ("tissue", "tissue"),
            ("stromal", "stromal"),
            ("intratumoral", "intratumoral"),
        ):
            g = self.geometries[name]
            if not g.is_empty and len(x):
                shapely.prepare(g)
                label[shapely.contains_xy(g, x, y)] = lab
        if not self.excluded.is_empty and len(x):
            shapely.prepare(self.excluded)
            label[shapely.contains_xy(self.excluded, x, y)] = "excluded"
        margin = self.geometries["invasive_margin"]
        in_margin = np.zeros(len(x), bool)
        if not margin.is_empty and len(x):
            shapely.prepare(margin)
            in_margin = shapely.contains_xy(margin, x, y)
        return label, in_margin


def build_compartments(
    regions: RegionSet | None,
    tissue: Any,
    mpp: float,
    margin_width_um: float = 500.0,
    automatic: RegionSet | None = None,
    artefacts: Any = None,
) -> Compartments:
    """Compartments from annotations, the automatic regions and the tissue.

    - scored area: the ``roi`` regions as drawn, else ``tissue``;
    - tumour bed: ``tumour_bed`` regions; else tumour + stroma regions when stroma is
      annotated; else the automatic bed;
    - intratumoral: ``tumour`` regions (else automatic nests) within the bed;
    - stromal: the bed minus the nests;
    - invasive margin: ``margin`` regions, else a band ``margin_width_um`` wide in all, half on
      each side of the bed border;
    - exclusions (``exclude``) and ``artefacts`` (ink, frames, pigment found by the tissue
      mask) are removed from every compartment; ``Compartments.excluded_areas`` holds, per
      compartment, the area they took from it.

    Parameters
    ----------
    tissue
        shapely geometry of the tissue in level-0 px (or None: no tissue limit).
    mpp
        Level-0 µm/px.
    """
    import shapely

    regions = regions or RegionSet([], "none")
    auto = automatic or RegionSet([], "automatic")
    empty = shapely.MultiPolygon()

    def has(c: str) -> bool:
        return regions.has(c)

    # an annotated roi is the scored area as drawn (QuPath's convention: an annotation's area is
    # its polygon's); otherwise the tissue mask is
    area = regions.geometry("roi") if has("roi") else tissue
    area_src = "annotation" if has("roi") else "tissue mask"
    excluded = regions.geometry("exclude")
    if artefacts is not None and not artefacts.is_empty:
        excluded = _polygonal(shapely.union(excluded, artefacts))
    removed: dict[str, float] = {}
    if has("tumour_bed"):
        bed, bed_src = regions.geometry("tumour_bed"), "annotation"
    elif has("stroma"):
        bed = shapely.union_all([regions.geometry("tumour"), regions.geometry("stroma")])
        bed_src = "annotation"
    elif has("tumour"):
        # nests annotated without a bed: the bed is the automatic one grown to hold them
        bed = shapely.union_all([regions.geometry("tumour"), auto.geometry("tumour_bed")])
        bed_src = "annotation + automatic"
    else:
        bed, bed_src = auto.geometry("tumour_bed"), "automatic"
    if has("tumour"):
        nests, nest_src = regions.geometry("tumour"), "annotation"
    else:
        nests, nest_src = auto.geometry("tumour"), "automatic"

    def clean(g: Any, name: str) -> Any:
        g = _polygonal(shapely.make_valid(g)) if not g.is_valid else _polygonal(g)
        if area is not None:
            g = _polygonal(shapely.intersection(g, area))
        before = g.area
        if not excluded.is_empty:
            g = _polygonal(shapely.difference(g, excluded))
        removed[name] = float(before - g.area)
        return g

    bed_c = clean(bed, "tumour_bed")
    intra = clean(shapely.intersection(nests, bed) if not bed.is_empty else empty, "intratumoral")
    stromal = clean(shapely.difference(bed, nests), "stromal")
    if has("margin"):
        margin, margin_src = clean(regions.geometry("margin"), "invasive_margin"), "annotation"
    elif bed.is_empty or margin_width_um <= 0:
        margin, margin_src = empty, bed_src
        removed["invasive_margin"] = 0.0
    else:
        half = margin_width_um / 2 / mpp
        margin = clean(shapely.buffer(shapely.boundary(bed), half, quad_segs=8), "invasive_margin")
        margin_src = bed_src
    tissue_c = clean(area, "tissue") if area is not None else clean(bed, "tissue")
    return Compartments(
        geometries={
            "intratumoral": intra,
            "stromal": stromal,
            "invasive_margin": margin,
            "tumour_bed": bed_c,
            "tissue": tissue_c,
        },
        sources={
            "intratumoral": nest_src,
            "stromal": bed_src if bed_src == nest_src else "annotation + automatic",
            "invasive_margin": margin_src,
            "tumour_bed": bed_src,
            "tissue": area_src,
        },
        excluded=excluded,
        excluded_areas=removed,
    )
