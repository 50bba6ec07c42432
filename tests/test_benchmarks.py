"""The benchmark suite's slide builders (benchmarks/run.py), which the issue's sizes rely on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import tilscore
from tilscore.synthetic import make_layout, write_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run import mosaic_slide, score_in_subprocess, stage_end_to_end, stage_scaling


def test_mosaic_repeats_the_slide_tiles_exactly(tmp_path: Path) -> None:
    base = tmp_path / "base.svs"
    layout = make_layout(marker="CD8", width_px=1024, height_px=768, mpp=0.25, seed=3)
    write_slide(layout, base, format="aperio", tile_size=256, min_level_size_px=128)
    path = mosaic_slide(tmp_path, base, 3, 2)
    with tilscore.open_slide(base) as b, tilscore.open_slide(path) as m:
        assert m.dimensions == (3 * 1024, 2 * 768)
        assert m.vendor == b.vendor == "aperio"
        assert m.mpp == b.mpp
        assert len(m.level_dimensions) == len(b.level_dimensions)
        ref = b.read_region(0, 0, 1024, 768)
        for i in range(3):
            for j in range(2):  # level 0: the same JPEG tiles, so the same pixels
                got = m.read_region(i * 1024, j * 768, 1024, 768)
                np.testing.assert_array_equal(got, ref)
        # lower levels are re-encoded: the same picture within JPEG noise
        f = round(b.level_downsamples[1])
        low = m.read_region(2 * 1024, 768, 1024 // f, 768 // f, level=1).astype(int)
        assert np.abs(low - b.read_region(0, 0, 1024 // f, 768 // f, level=1)).mean() < 2.0
    assert mosaic_slide(tmp_path, base, 3, 2) == path  # cached


def test_end_to_end_rows_time_the_outputs_too(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "small.svs"
    layout = make_layout(marker="CD8", width_px=1024, height_px=768, mpp=0.25, seed=5)
    write_slide(layout, path, format="aperio", tile_size=256, min_level_size_px=128)
    res = score_in_subprocess(path, "classical")
    assert res["how"] == "score_slide"
    assert res["n_cells"] > 0
    assert res["save_seconds"] > 0
    assert res["peak_rss_with_save_mb"] >= res["peak_rss_mb"] > 0
    # resident memory sampled per stage (Linux): every sample lies below the process's peak
    linux = Path("/proc/self/status").exists()
    peaks = res["stage_peak_mb"]
    assert bool(peaks) == linux
    assert set(peaks) <= {"start", "qc", "detect", "regions", "score", "save"}
    assert all(0 < mb <= res["peak_rss_with_save_mb"] + 1 for mb in peaks.values())
    # every variant of the end-to-end stage, here with the quick classical run standing in
    import run

    monkeypatch.setattr(run, "score_in_subprocess", lambda p, *a, **k: res)
    rows, _ = stage_end_to_end(path, repeats=1)
    save_rows = [r for r in rows if r.stage == "score + save"]
    assert [r.units for r in save_rows] == ["MP tissue/s", "MB peak RSS"]
    assert save_rows[0].ours < rows[0].ours  # saving takes time
    assert all(r.met for r in rows if r.units == "MB peak RSS")  # a small slide, far below 2 GB
    scaling = stage_scaling([path, path])
    assert [r.ours_name for r in scaling[:3]] == [
        "time",
        "peak memory",
        "peak memory, outputs written",
    ]
    assert all(r.ratio == 1.0 for r in scaling)  # the same result on both "sizes"
    if linux:  # the memory row says in which stage the peak happened
        assert scaling[1].note.startswith("sampled peak in stage")
