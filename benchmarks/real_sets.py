"""The real labelled IHC sets in ``../shared/data``, loaded the same way for every evaluation.

Each loader yields one dict per image ("case"):

- ``set``, ``name``: the set and the image;
- ``image``: (H, W, 3) uint8 RGB; ``mpp``: the µm/px used (estimated from nucleus sizes where
  the source does not state it, see each MANIFEST.md);
- ``marker``: the marker the labels are for;
- ``truth``: a table ``x, y, positive`` in continuous pixel coordinates (QuPath's: the centre of
  pixel (i, j) is (i + 0.5, j + 0.5));
- ``positive_only``: only positive cells are labelled (no all-cell metrics);
- ``every_cell``: every cell is labelled (in the ROI where there is one), so that
  cells counted / labelled is a meaningful count ratio;
- ``roi``: a bool mask of the scored region (or None), and ``roi_path``, the mask file.

============  ======  ========  ===============================================================
set           marker  µm/px     labels
============  ======  ========  ===============================================================
lyon19        CD8     0.125     DAB-positive lymphocytes only (CD3/CD8; 512 px NuClick patches
                                upsampled about 2x from 0.24 µm/px)
deepliif      Ki67    0.25      positive and negative nuclei from co-registered IF (not every
                                nucleus is labelled, but nearly)
dlubak        Ki67    0.5       positive and negative tumour nuclei, inside the ROI mask only
ehh2025       Ki67    1.0       positive nuclei (mild/moderate/strong) exhaustively; negatives
                                not exhaustive: positive-cell metrics only
endonuke      ER/PR   0.5       every nucleus, no positive/negative labels (all-cell metrics
                                only); tiles in the same hundreds are one slide
============  ======  ========  ===============================================================

The real sets are validation data for the shipped weights, except EndoNuke (CC BY 4.0), which
may be trained on with attribution (see its MANIFEST).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: µm/px assumed for each real set (none of the files records it)
SET_MPP = {"lyon19": 0.125, "deepliif": 0.25, "dlubak": 0.5, "ehh2025": 1.0, "endonuke": 0.5}


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (alpha dropped)."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _truth(x, y, positive) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "x": np.asarray(x, dtype=float),
            "y": np.asarray(y, dtype=float),
            "positive": np.asarray(positive, dtype=bool),
        }
    )


def lyon19_cases(root: Path = SHARED_DATA) -> Iterator[dict]:
    d = root / "nuclick-ihc-lyon19"
    cells = pd.read_csv(d / "cells.csv")
    for img in sorted((d / "images").glob("*.jpg")):
        t = cells[cells.image == img.name]
        yield {
            "set": "lyon19",
            "name": img.name,
            "image": read_rgb(img),
            "path": img,
            "mpp": SET_MPP["lyon19"],
            "marker": "CD8",
            "truth": _truth(t.x, t.y, np.ones(len(t), bool)),
            "positive_only": True,
            "every_cell": False,
            "roi": None,
            "roi_path": None,
        }


def deepliif_cases(root: Path = SHARED_DATA) -> Iterator[dict]:
    d = root / "deepliif-ki67" / "labeled"
    for img in sorted(d.glob("*_ihc.png")):
        name = img.name[: -len("_ihc.png")]
        t = pd.read_csv(d / f"{name}_cells.csv")
        yield {
            "set": "deepliif",
            "name": name,
            "image": read_rgb(img),
            "path": img,
            "mpp": SET_MPP["deepliif"],
            "marker": "Ki67",
            "truth": _truth(t.x, t.y, t["class"] == "positive"),
            "positive_only": False,
            "every_cell": True,
            "roi": None,
            "roi_path": None,
        }


def dlubak_cases(root: Path = SHARED_DATA) -> Iterator[dict]:
    d = root / "ki67-points-dlubak" / "labeled"
    t = pd.read_csv(d / "503-05_markers.csv")
    roi_path = d / "503-05_roi.png"
    yield {
        "set": "dlubak",
        "name": "503-05",
        "image": read_rgb(d / "503-05_image.png"),
        "path": d / "503-05_image.png",
        "mpp": SET_MPP["dlubak"],
        "marker": "Ki67",
        # markers are integer pixel indices: their centres are at +0.5
        "truth": _truth(t.x + 0.5, t.y + 0.5, t.type == 1),
        "positive_only": False,
        "every_cell": True,
        "roi": read_rgb(roi_path)[..., 0] > 127,
        "roi_path": roi_path,
    }


def ehh_cases(root: Path = SHARED_DATA) -> Iterator[dict]:
    d = root / "ki67-net-ehh2025"
    for img in sorted((d / "images").glob("*.png")):
        rgb = read_rgb(img)
        h, w = rgb.shape[:2]
        lab = np.loadtxt(d / "labels_yolo" / f"{img.stem}.txt", ndmin=2)
        pos = lab[lab[:, 0] < 3]
        yield {
            "set": "ehh2025",
            "name": img.name,
            "image": rgb,
            "path": img,
            "mpp": SET_MPP["ehh2025"],
            "marker": "Ki67",
            "truth": _truth(pos[:, 1] * w, pos[:, 2] * h, np.ones(len(pos), bool)),
            "positive_only": True,
            "every_cell": False,
            "roi": None,
            "roi_path": None,
        }


def ehh_all_cells(root: Path = SHARED_DATA) -> Iterator[dict]:
    """EHH with every labelled cell (negatives too, though those are not exhaustive)."""
    d = root / "ki67-net-ehh2025"
    for case in ehh_cases(root):
        h, w = case["image"].shape[:2]
        lab = np.loadtxt(d / "labels_yolo" / f"{Path(case['name']).stem}.txt", ndmin=2)
        case = dict(case, truth=_truth(lab[:, 1] * w, lab[:, 2] * h, lab[:, 0] < 3))
        yield case


#: EndoNuke id hundreds held out from training the default model (``id // 100``); tiles of one
#: hundred are likely one slide, so the split is by hundreds, never at random
ENDONUKE_VAL_HUNDREDS = (6, 9)


def endonuke_ids(root: Path = SHARED_DATA) -> list[int]:
    """The EndoNuke tile ids, sorted."""
    return sorted(int(p.stem) for p in (root / "endonuke-ihc" / "images").glob("*.png"))


def endonuke_cases(root: Path = SHARED_DATA, ids: list[int] | None = None) -> Iterator[dict]:
    d = root / "endonuke-ihc"
    for i in endonuke_ids(root) if ids is None else ids:
        lab = np.loadtxt(d / "labels" / f"{i}.txt", ndmin=2).reshape(-1, 3)
        yield {
            "set": "endonuke",
            "name": str(i),
            "image": read_rgb(d / "images" / f"{i}.png"),
            "path": d / "images" / f"{i}.png",
            "mpp": SET_MPP["endonuke"],
            "marker": "Ki67",  # a nuclear marker like ER/PR; no positive labels exist
            # points are integer pixel indices: their centres are at +0.5
            "truth": _truth(lab[:, 0] + 0.5, lab[:, 1] + 0.5, np.zeros(len(lab), bool)),
            "positive_only": False,
            "every_cell": True,
            "no_positive_labels": True,
            "roi": None,
            "roi_path": None,
        }


LOADERS = {
    "lyon19": lyon19_cases,
    "deepliif": deepliif_cases,
    "dlubak": dlubak_cases,
    "ehh2025": ehh_cases,
    "endonuke": endonuke_cases,
}


def all_cases(root: Path = SHARED_DATA, sets: list[str] | None = None) -> dict[str, list[dict]]:
    """Every real set found under ``root`` (a set whose folder is missing is left out)."""
    out: dict[str, list[dict]] = {}
    for name, loader in LOADERS.items():
        if sets is not None and name not in sets:
            continue
        try:
            out[name] = list(loader(root))
        except FileNotFoundError:
            continue
    return out
