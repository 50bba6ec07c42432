"""Batch runs: discovery, markers, keys, errors.csv, resume, kill-and-resume, worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tilscore.batch import (
    BatchItem,
    assign_slide_ids,
    discover_slides,
    marker_from_name,
    plan_batch,
    run_batch,
    scoring_config_hash,
    slide_key,
)
from tilscore.config import load_config
from tilscore.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "example_slides"
SLIDES = ("synthetic_cd8", "synthetic_cd68", "synthetic_cd56")

#: Scoring restricted to what a batch needs (the classical detector, no figures), to keep the
#: tests fast; the batch logic does not depend on which detector scores.
FAST = {
    "detect": {"detector": "classical"},
    "output": {
        "cells_geojson": False,
        "regions_geojson": False,
        "overlay": False,
        "heatmap": False,
        "report": False,
    },
}


def _write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """The three example slides, a corrupt file, a slide without µm/px, one without a marker."""
    import tifffile

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in SLIDES:
        shutil.copy(EXAMPLES / f"{name}.tif", folder / f"{name}.tif")
    _write(folder / "broken_CD68.svs", b"not a slide at all" * 100)
    rgb = np.full((256, 256, 3), 200, np.uint8)
    tifffile.imwrite(folder / "nompp_CD8.tif", rgb)  # no resolution tags: no µm/px
    shutil.copy(EXAMPLES / "synthetic_cd8.tif", folder / "unlabelled_HE.tif")
    return folder


# ----------------------------------------------------------------------------------------------
# discovery, ids, markers, keys (no scoring)


def test_discovery_finds_slides_recursively_and_skips_the_output(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "a.svs")
    _write(tmp_path / "in" / "sub" / "b.ome.tiff")
    _write(tmp_path / "in" / "notes.txt")
    _write(tmp_path / "in" / "a.cells.csv")  # a CSV found in a folder is not a manifest
    _write(tmp_path / "in" / ".hidden" / "c.svs")
    _write(tmp_path / "in" / "out" / "old.tif")  # the output folder inside the input
    _write(tmp_path / "in" / "dicom" / "x.dcm")  # a folder of .dcm files is one slide
    _write(tmp_path / "in" / "dicom" / "y.dcm")
    items = discover_slides([tmp_path / "in"], exclude=tmp_path / "in" / "out")
    names = sorted(it.path.name for it in items)
    assert names == ["a.svs", "b.ome.tiff", "dicom"]
    assign_slide_ids(items)
    assert sorted(it.slide_id for it in items) == ["a", "b", "dicom"]


def test_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        discover_slides([tmp_path / "nope"])


def test_manifest_paths_markers_and_extra_columns(tmp_path: Path) -> None:
    _write(tmp_path / "data" / "s1.svs")
    _write(tmp_path / "data" / "s2.tif")
    _write(tmp_path / "data" / "s2.geojson", b"{}")
    manifest = tmp_path / "data" / "m.csv"
    manifest.write_text(
        "path,marker,patient,timepoint,mpp,site,regions\n"
        "s1.svs,cd68,007,pre,0.25,breast,\n"
        f"{tmp_path / 'data' / 's2.tif'},,007,post,,breast,s2.geojson\n"
    )
    # the folder also finds s1 and s2; the manifest rows (with their metadata) win
    items = plan_batch([tmp_path / "data", manifest], config=load_config(None), marker="CD8")
    by_name = {it.path.name: it for it in items}
    assert len(items) == 2
    s1, s2 = by_name["s1.svs"], by_name["s2.tif"]
    assert (s1.marker, s1.marker_source, s1.mpp) == ("CD68", "manifest", 0.25)
    assert s1.meta == {"patient": "007", "timepoint": "pre", "site": "breast"}
    assert (s2.marker, s2.marker_source) == ("CD8", "--marker")
    assert s2.regions == tmp_path / "data" / "s2.geojson"


def test_regions_file_beside_a_slide_is_used(tmp_path: Path) -> None:
    _write(tmp_path / "a_CD8.tif")
    _write(tmp_path / "a_CD8.regions.geojson", b"{}")
    _write(tmp_path / "b_CD8.ome.tif")
    _write(tmp_path / "b_CD8.geojson", b"{}")
    _write(tmp_path / "c_CD8.tif")
    items = {it.slide_id: it for it in plan_batch([tmp_path])}
    assert items["a_CD8"].regions == tmp_path / "a_CD8.regions.geojson"
    assert items["b_CD8"].regions == tmp_path / "b_CD8.geojson"
    assert items["c_CD8"].regions is None  # automatic compartments
    off = plan_batch([tmp_path], config={"batch": {"regions_beside": ""}})
    assert all(it.regions is None for it in off)


def test_unknown_marker_option_is_a_usage_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.tif")
    with pytest.raises(ConfigError, match="unknown marker"):
        plan_batch([tmp_path], marker="CD99")


def test_manifest_without_path_column_is_a_usage_error(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "m.csv", b"file,marker\na.svs,CD8\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        discover_slides([manifest])


def test_slide_ids_are_unique_and_safe(tmp_path: Path) -> None:
    items = [
        BatchItem(path=tmp_path / "a" / "case 1 (CD8).svs"),
        BatchItem(path=tmp_path / "b" / "case 1 (CD8).svs"),
        BatchItem(path=tmp_path / "c" / "CASE 1 (cd8).svs"),
        BatchItem(path=tmp_path / "cells.tif"),
        BatchItem(path=tmp_path / "x.ome.tif"),
    ]
    assign_slide_ids(items)
    ids = [it.slide_id for it in items]
    assert len({i.lower() for i in ids}) == len(ids)
    assert all(i.replace("-", "").replace("_", "").replace(".", "").isalnum() for i in ids)
    assert ids[0].startswith("case_1_CD8-")
    assert ids[3] != "cells"  # OUT/cells holds the cell tables
    assert ids[4] == "x"
    again = [BatchItem(path=it.path) for it in reversed(items)]
    assign_slide_ids(again)  # ids do not depend on the order of the inputs
    assert sorted(it.slide_id for it in again) == sorted(ids)


@pytest.mark.parametrize(
    ("name", "marker"),
    [
        ("P012_pre_CD8", "CD8"),
        ("synthetic_cd68", "cd68"),
        ("slide-Ki-67-x", "Ki-67"),
        ("CD3-biopsy", "CD3"),
        ("CD80_slide", None),
        ("HE_slide", None),
    ],
)
def test_marker_from_file_name(name: str, marker: str | None) -> None:
    pattern = load_config(None)["batch"]["marker_pattern"]
    assert marker_from_name(name, pattern) == marker


def test_two_markers_in_a_name_are_not_guessed() -> None:
    with pytest.raises(ConfigError, match="several markers"):
        marker_from_name("CD3_CD8_double", load_config(None)["batch"]["marker_pattern"])


def test_key_follows_input_and_scoring_config_not_batch_options(tmp_path: Path) -> None:
    path = _write(tmp_path / "s_CD8.tif", b"x" * 5000)
    item = BatchItem(path=path, slide_id="s", marker="CD8")
    base = load_config(None)
    h = scoring_config_hash(base)
    key = slide_key(item, h)
    assert slide_key(item, h) == key
    assert scoring_config_hash(load_config({"batch": {"workers": 3}})) == h
    assert scoring_config_hash(load_config({"detect": {"detector": "classical"}})) != h
    assert slide_key(BatchItem(path=path, slide_id="s", marker="CD68"), h) != key
    path.write_bytes(b"y" * 5000)
    assert slide_key(item, h) != key
    assert slide_key(item, h, "full") != slide_key(item, h)


def test_an_output_folder_takes_one_batch_at_a_time(tmp_path: Path) -> None:
    from tilscore.batch import _lock

    with _lock(tmp_path), pytest.raises(ConfigError, match="another batch"), _lock(tmp_path):
        pass
    with _lock(tmp_path):  # released
        pass
    import socket

    (tmp_path / ".batch.lock").write_text(f"{socket.gethostname()} 999999999")
    with _lock(tmp_path):  # a lock of a process that is gone is taken over
        pass


# ----------------------------------------------------------------------------------------------
# whole runs


def _summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "summary.csv")


def _no_temporaries(out: Path) -> None:
    left = [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    left += [p for p in out.rglob("*.tmp")]
    assert left == []


@pytest.mark.slow
def test_batch_scores_good_slides_reports_bad_ones_and_resumes(cohort: Path, tmp_path: Path):
    out = tmp_path / "out"
    report = run_batch([cohort], out, config=FAST, processes=False, workers=1)
    assert sorted(report.done) == sorted(SLIDES)
    assert report.n_failed == 3
    assert not report.ok
    errors = pd.read_csv(out / "errors.csv")
    by_id = dict(zip(errors.slide_id, errors.error_type))
    assert set(by_id) == {"broken_CD68", "nompp_CD8", "unlabelled_HE"}
    assert by_id["broken_CD68"] in ("SlideReadError", "UnsupportedFormatError")
    assert by_id["nompp_CD8"] == "MissingPixelSizeError"
    assert by_id["unlabelled_HE"] == "UnknownMarker"
    assert errors.message.str.contains(str(cohort)).all()  # every message names its file

    summary = _summary(out)
    assert set(summary.slide_id) == set(SLIDES)
    assert dict(summary.groupby("slide_id").marker.first()) == {
        "synthetic_cd8": "CD8",
        "synthetic_cd68": "CD68",
        "synthetic_cd56": "CD56",
    }
    for sid in SLIDES:
        done = json.loads((out / sid / "batch.json").read_text())
        assert len(done["key"]) == 64
        cells = pd.read_parquet(out / "cells" / f"{sid}.parquet")
        assert len(cells) > 1000  # each example slide holds about 3800 cells
    _no_temporaries(out)

    # the same command again: nothing new is scored, the failures are tried and reported again
    stamps = {sid: (out / sid / "batch.json").stat().st_mtime_ns for sid in SLIDES}
    again = run_batch([cohort], out, config=FAST, processes=False, workers=1)
    assert again.done == []
    assert sorted(again.skipped) == sorted(SLIDES)
    assert again.n_failed == 3
    assert {sid: (out / sid / "batch.json").stat().st_mtime_ns for sid in SLIDES} == stamps
    assert len(_summary(out)) == len(summary)

    # a changed scoring config redoes them; a changed slide redoes only that slide
    changed = {**FAST, "regions": {"margin_width_um": 300.0}}
    redo = run_batch([cohort], out, config=changed, processes=False, workers=1)
    assert sorted(redo.done) == sorted(SLIDES)
    os.utime(cohort / "synthetic_cd68.tif", ns=(time.time_ns(), time.time_ns()))
    one = run_batch([cohort], out, config=changed, processes=False, workers=1)
    assert one.done == ["synthetic_cd68"]
    forced = run_batch(
        [cohort / "synthetic_cd8.tif"], out, config=changed, processes=False, force=True
    )
    assert forced.done == ["synthetic_cd8"]
    assert forced.ok
    _no_temporaries(out)


@pytest.mark.slow
def test_manifest_columns_reach_the_summary(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "synthetic_cd68.tif", tmp_path / "biopsy_a.tif")
    shutil.copy(EXAMPLES / "synthetic_cd8.tif", tmp_path / "biopsy_b.tif")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        "path,marker,patient,timepoint,arm\n"
        "biopsy_a.tif,CD68,P07,pre,B\n"
        "missing.tif,CD8,P07,post,B\n"
        "biopsy_b.tif,CD99,P08,pre,A\n"
    )
    out = tmp_path / "out"
    report = run_batch([manifest], out, config=FAST, processes=False, workers=1)
    assert report.done == ["biopsy_a"]
    errors = {r["slide_id"]: r["error_type"] for r in report.failed}
    assert errors == {"missing": "SlideReadError", "biopsy_b": "UnknownMarker"}
    summary = _summary(out)
    assert set(summary.patient) == {"P07"}
    assert set(summary.timepoint) == {"pre"}
    assert set(summary.arm) == {"B"}
    assert set(summary.marker) == {"CD68"}


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tilscore", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_batch_keeps_finished_slides_and_resumes(tmp_path: Path, sig) -> None:
    """`tilscore batch` on worker processes, signalled after its first slide, then resumed.

    The signal goes to the whole process group, as Ctrl-C in a terminal or SLURM's scancel do.
    """
    folder = tmp_path / "slides"
    folder.mkdir()
    names = SLIDES[:2]
    for name in names:
        shutil.copy(EXAMPLES / f"{name}.tif", folder / f"{name}.tif")
    config = tmp_path / "fast.toml"
    config.write_text(load_config(FAST).to_toml())
    out = tmp_path / "out"
    args = ["batch", str(folder), "-o", str(out), "--config", str(config)]
    proc = _run_cli([*args, "--workers", "1", "--threads-per-worker", "1"], start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/batch.json")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no slide finished in time"
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    log, _ = proc.communicate(timeout=120)
    finished = sorted(p.parent.name for p in out.glob("*/batch.json"))
    if proc.returncode == 0:  # it finished every slide before the signal arrived
        assert finished == sorted(names)
    else:
        assert proc.returncode == 130, log
        assert "interrupted" in log
        assert "Traceback" not in log
    assert finished
    _no_temporaries(out)
    for sid in finished:  # a folder there is a whole result
        assert (out / sid / "summary.csv").is_file()
        assert (out / sid / "cells.parquet").is_file()
    assert set(_summary(out).slide_id) == set(finished)
    stamps = {sid: (out / sid / "batch.json").stat().st_mtime_ns for sid in finished}

    resumed = _run_cli([*args, "--workers", "2"])
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert {sid: (out / sid / "batch.json").stat().st_mtime_ns for sid in finished} == stamps
    summary = _summary(out)
    assert set(summary.slide_id) == set(names)
    assert not summary.duplicated(["slide_id", "compartment"]).any()
    assert pd.read_csv(out / "errors.csv").empty
    _no_temporaries(out)


@pytest.mark.slow
def test_worker_killed_mid_slide_is_reported_and_resumed(tmp_path: Path) -> None:
    """A worker process killed under its slide (here: by its memory limit) fails that slide
    only; nothing half-written stays, and a run with room enough scores it."""
    import dask
    import distributed  # noqa: F401  (its config defaults load before the override)

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(EXAMPLES / "synthetic_cd8.tif", folder / "synthetic_cd8.tif")
    out = tmp_path / "out"
    tight = {**FAST, "batch": {"memory_limit": "250MB"}}  # below one scoring worker's needs
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        report = run_batch([folder], out, config=tight, workers=1, processes=True)
    assert report.done == []
    assert [r["error_type"] for r in report.failed] == ["KilledWorker"]
    assert pd.read_csv(out / "errors.csv").error_type.tolist() == ["KilledWorker"]
    assert not (out / "synthetic_cd8").exists()
    _no_temporaries(out)
    # the memory limit is a [batch] option: it does not change the slide's key
    again = run_batch([folder], out, config=FAST, processes=False, workers=1)
    assert again.done == ["synthetic_cd8"]
    assert pd.read_csv(out / "errors.csv").empty


@pytest.mark.slow
def test_existing_cluster_by_address(tmp_path: Path) -> None:
    from distributed import LocalCluster

    shutil.copy(EXAMPLES / "synthetic_cd56.tif", tmp_path / "s_CD56.tif")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        report = run_batch(
            [tmp_path / "s_CD56.tif"], tmp_path / "out", FAST, scheduler=cluster.scheduler_address
        )
        assert report.done == ["s_CD56"]
        assert len(cluster.scheduler.workers) == 1  # the cluster is left running
    assert set(_summary(tmp_path / "out").marker) == {"CD56"}


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    from tilscore.cli import main

    assert main(["batch", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["batch", str(empty), "-o", str(tmp_path / "out")]) == 2
    args = ["batch", str(empty), "-o", str(tmp_path / "out"), "--scheduler", "tcp://x:1"]
    assert main([*args, "--workers", "2"]) == 2


def test_config_show_prints_loadable_defaults(capsys, tmp_path: Path) -> None:
    from tilscore.cli import main

    assert main(["config", "--show"]) == 0
    text = capsys.readouterr().out
    assert "marker_pattern" in text
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml").hash() == load_config(None).hash()
