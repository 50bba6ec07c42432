"""Serial sections: align a slide to a reference slide, so one annotation serves every marker.

CD8, CD68 and CD56 are stained on serial sections of one block: the tissue has the same shape,
moved, turned and sometimes flipped on the glass. :func:`register_slides` finds the rigid (or
affine) transform between the two tissue masks: a coarse search over the orientation (principal
axes, with and without a mirror flip, each turned by 0 and 180 degrees) from the masks' moments,
then OpenCV's ECC refinement on the smoothed masks. The result maps level-0 px of the reference
to level-0 px of the moving slide, records how well the masks agree (IoU), and carries a QC
overlay. :meth:`Registration.transform_regions` moves annotations drawn on the reference onto
the moving slide.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, TilscoreWarning

__all__ = ["Registration", "register_slides"]

#: Below this mask IoU after registration the result is flagged (a warning).
MIN_GOOD_IOU = 0.7


@dataclass
class Registration:
    """A transform from reference level-0 px to moving level-0 px.

    Attributes
    ----------
    matrix
        (2, 3) affine matrix: ``[x_m, y_m] = matrix @ [x_r, y_r, 1]``.
    iou
        Tissue-mask IoU after alignment (0-1).
    iou_before
        The same without any transform (slides overlaid as they are).
    motion
        "rigid" or "affine".
    mpp
        Pixel size (µm/px) of the masks the transform was found on.
    reference, moving
        The two slides' paths (or names).
    qc
        RGB QC image: reference tissue in green, moved tissue in magenta, overlap white.
    """

    matrix: np.ndarray
    iou: float
    iou_before: float
    motion: str
    mpp: float
    reference: str
    moving: str
    qc: np.ndarray | None = field(default=None, repr=False)

    @property
    def rotation_deg(self) -> float:
        """Rotation angle of the linear part (degrees, counter-clockwise in image axes)."""
        return float(math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0])))

    @property
    def flipped(self) -> bool:
        """True when the transform mirrors the section (negative determinant)."""
        return bool(np.linalg.det(self.matrix[:, :2]) < 0)

    def map_points(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Reference level-0 px -> moving level-0 px."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        m = self.matrix
        return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]

    def transform_regions(self, regions: Any) -> Any:
        """A :class:`~tilscore.regions.RegionSet` drawn on the reference, moved to this slide."""
        import shapely

        from .regions import Region, RegionSet, load_regions

        rs = load_regions(regions)
        a, b, xoff = self.matrix[0]
        d, e, yoff = self.matrix[1]
        params = [a, b, d, e, xoff, yoff]
        moved = [
            Region(r.cls, shapely.affinity.affine_transform(r.geometry, params), r.name) for r in rs
        ]
        return RegionSet(moved, f"{rs.source} (registered)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (the transform is recorded with the results that use it)."""
        return {
            "reference": self.reference,
            "moving": self.moving,
            "motion": self.motion,
            "matrix": self.matrix.round(6).tolist(),
            "rotation_deg": round(self.rotation_deg, 3),
            "flipped": self.flipped,
            "iou": round(self.iou, 4),
            "iou_before": round(self.iou_before, 4),
            "mask_mpp": self.mpp,
        }

    def save_qc(self, path: str | os.PathLike) -> Path:
        """Write the QC overlay as PNG."""
        from .export import write_png

        if self.qc is None:
            raise ConfigError("this registration has no QC image")
        return write_png(self.qc, Path(path))


def _mask_at(slide: Any, mpp: float) -> tuple[np.ndarray, float]:
    """Tissue mask of a slide at ``mpp`` µm/px (float32 0/1) and its level-0 px per mask px."""
    import cv2

    from .tissue import tissue_mask

    tm = tissue_mask(slide, target_mpp=mpp)
    m = tm.mask.astype(np.float32)
    ds = tm.downsample
    # bring both slides to exactly ``mpp`` µm per mask pixel
    scale = ds * slide.mpp / mpp
    if abs(scale - 1) > 1e-3:
        m = cv2.resize(m, (max(1, round(m.shape[1] * scale)), max(1, round(m.shape[0] * scale))))
        m = (m > 0.5).astype(np.float32)
    return m, mpp / slide.mpp


def _moments(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(m > 0.5)
    c = np.array([xs.mean(), ys.mean()])
    cov = np.cov(np.vstack([xs - c[0], ys - c[1]]))
    _, vecs = np.linalg.eigh(cov)
    axes = vecs[:, ::-1]  # major axis first
    if np.linalg.det(axes) < 0:
        axes[:, 1] *= -1
    return c, axes


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def _warp(m: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample moving mask ``m`` onto the reference grid: ref px -> ``matrix`` -> moving px."""
    import cv2

    return cv2.warpAffine(
        m,
        matrix.astype(np.float32),
        (shape[1], shape[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderValue=0,
    )


def register_slides(
    moving: Any,
    reference: Any,
    *,
    motion: str = "rigid",
    mpp: float = 16.0,
    allow_flip: bool = True,
) -> Registration:
    """Align ``moving`` to ``reference`` by their tissue masks.

    Parameters
    ----------
    moving, reference
        Slide paths or open :class:`~tilscore.slide.Slide` objects (serial sections).
    motion
        "rigid" (rotation + translation, and a mirror flip when ``allow_flip``) or "affine"
        (also scale and shear: sections that shrank or stretched).
    mpp
        Pixel size (µm/px) of the masks compared (coarse is robust and fast).
    allow_flip
        Also try the mirror image (a section laid upside down on the glass).

    Returns
    -------
    Registration
        Reference level-0 px -> moving level-0 px, with the masks' IoU and a QC overlay. A
        TilscoreWarning is issued when the IoU stays below :data:`MIN_GOOD_IOU`.
    """
    import warnings

    import cv2

    from .slide import Slide, open_slide

    if motion not in ("rigid", "affine"):
        raise ConfigError(f"motion must be 'rigid' or 'affine', got {motion!r}")
    opened = []
    try:
        slides = []
        for s in (moving, reference):
            if isinstance(s, Slide):
                slides.append(s)
            else:
                opened.append(open_slide(s))
                slides.append(opened[-1])
        mov, ref = slides
        m_mov, ds_mov = _mask_at(mov, mpp)
        m_ref, ds_ref = _mask_at(ref, mpp)
        if m_mov.sum() == 0 or m_ref.sum() == 0:
            raise ConfigError(
                "no tissue found on "
                + ("the moving slide" if m_mov.sum() == 0 else "the reference slide"),
                hint="registration needs tissue on both slides",
            )
        c_r, ax_r = _moments(m_ref)
        c_m, ax_m = _moments(m_mov)
        # candidate linear parts: map the reference's principal axes onto the moving's, with
        # each sign choice (0/180 degrees) and, if allowed, a mirror flip
        best = None
        flips = (1, -1) if allow_flip else (1,)
        for s0 in (1, -1):
            for s1 in flips:
                target = ax_m * np.array([s0, s0 * s1])
                lin = target @ ax_r.T  # ref offset -> moving offset
                t = c_m - lin @ c_r
                mat = np.hstack([lin, t[:, None]])
                score = _iou(m_ref, _warp(m_mov, mat, m_ref.shape))
                if best is None or score > best[0]:
                    best = (score, mat)
        score, mat = best
        # ECC refinement on smoothed masks (warp maps reference px -> moving px)
        sigma = 2.0
        a = cv2.GaussianBlur(m_ref, (0, 0), sigma)
        b = cv2.GaussianBlur(m_mov, (0, 0), sigma)
        flipped = np.linalg.det(mat[:, :2]) < 0
        if flipped:  # ECC's Euclidean model has no mirror: refine on the mirrored moving mask
            b = b[:, ::-1].copy()
            mirror = np.array([[-1.0, 0, b.shape[1] - 1], [0, 1, 0], [0, 0, 1]])
            mat3 = mirror @ np.vstack([mat, [0, 0, 1]])
            mat = mat3[:2]
        mode = cv2.MOTION_EUCLIDEAN if motion == "rigid" else cv2.MOTION_AFFINE
        coarse = mat.astype(np.float32)
        warp = coarse.copy()  # OpenCV updates it in place, also when it then gives up
        try:
            _, warp = cv2.findTransformECC(
                a,
                b,
                warp,
                mode,
                (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 200, 1e-6),
                None,
                5,
            )
        except cv2.error:
            warp = coarse
        # keep the refinement only where it improves the overlap (ECC can wander off)
        if _iou(m_ref, _warp(b, warp, a.shape)) < _iou(m_ref, _warp(b, coarse, a.shape)):
            warp = coarse
        mat = warp.astype(np.float64)
        if flipped:
            mirror = np.array([[-1.0, 0, b.shape[1] - 1], [0, 1, 0], [0, 0, 1]])
            mat = (mirror @ np.vstack([mat, [0, 0, 1]]))[:2]
        moved = _warp(m_mov, mat, m_ref.shape)
        iou = _iou(m_ref, moved)
        h = max(m_ref.shape[0], m_mov.shape[0])
        w = max(m_ref.shape[1], m_mov.shape[1])
        before = _iou(
            np.pad(m_ref, ((0, h - m_ref.shape[0]), (0, w - m_ref.shape[1]))),
            np.pad(m_mov, ((0, h - m_mov.shape[0]), (0, w - m_mov.shape[1]))),
        )
        # mask px -> level-0 px on both sides: x0_mov = ds_mov * M @ [x0_ref / ds_ref, 1]
        # (mask pixel centres sit at (i + 0.5) * ds)
        s_ref = np.array([[1 / ds_ref, 0, -0.5], [0, 1 / ds_ref, -0.5], [0, 0, 1]])
        s_mov = np.array([[ds_mov, 0, 0.5 * ds_mov], [0, ds_mov, 0.5 * ds_mov], [0, 0, 1]])
        full = s_mov @ np.vstack([mat, [0, 0, 1]]) @ s_ref
        qc = np.zeros((*m_ref.shape, 3), np.uint8)
        qc[..., 1] = (m_ref > 0.5) * 200
        qc[..., 0] = (moved > 0.5) * 200
        qc[..., 2] = (moved > 0.5) * 200
        qc[(m_ref > 0.5) & (moved > 0.5)] = 255
        reg = Registration(
            matrix=full[:2],
            iou=iou,
            iou_before=before,
            motion=motion,
            mpp=mpp,
            reference=str(ref.path),
            moving=str(mov.path),
            qc=qc,
        )
        if iou < MIN_GOOD_IOU:
            warnings.warn(
                f"{mov.path}: registration to {ref.path} is poor (tissue IoU {iou:.2f}); check "
                "the QC overlay before using the moved annotations",
                TilscoreWarning,
                stacklevel=2,
            )
        return reg
    finally:
        for s in opened:
            s.close()
