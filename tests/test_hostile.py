"""Hostile input and misuse (issue 17): each bad input is built in a temporary folder and the CLI
is run as a user runs it (a subprocess), so that the promise "one line naming the file and the
fix, exit 2, nothing lost, no hang" is tested, not hoped for."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_slides"
SLIDE = EXAMPLES / "synthetic_cd8.tif"

#: scoring restricted to what these tests need (classical detector, few files)
FAST_TOML = """
[detect]
detector = "classical"
[output]
cells_geojson = false
regions_geojson = false
overlay = false
heatmap = false
report = false
"""


def cli(*args: object, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``tilscore ARGS`` in a fresh process, as a user types it."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "tilscore", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and exactly one line on stderr, holding each of ``needles``."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory) -> Path:
    """Two small synthetic CD8 slides (800 x 600 px) and the fast config."""
    from tilscore.synthetic import make_synthetic_slide

    folder = tmp_path_factory.mktemp("slides")
    for i, name in enumerate(("a_CD8", "b_CD8")):
        make_synthetic_slide(folder / f"{name}.tif", marker="CD8", width_px=800, height_px=600,
                             seed=11 + i)  # fmt: skip
        for extra in folder.glob(f"{name}.*"):
            if extra.suffix != ".tif":
                extra.unlink()
    (folder.parent / f"{folder.name}.toml").write_text(FAST_TOML)
    return folder


def _config(slides: Path) -> Path:
    return slides.parent / f"{slides.name}.toml"


# ----------------------------------------------------------------------------------------------
# 4. a batch re-run on fewer inputs keeps the other finished slides


@pytest.mark.slow
def test_batch_rerun_on_fewer_inputs_keeps_every_finished_slide(small_slides, tmp_path):
    out = tmp_path / "res"
    cfg = _config(small_slides)
    first = cli("batch", small_slides, "-o", out, "--config", cfg, "--workers", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    again = cli("batch", small_slides / "a_CD8.tif", "-o", out, "--config", cfg, "--workers", "1",
                "--force")  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 from earlier runs kept" in again.stdout
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary.slide_id) == {"a_CD8", "b_CD8"}
    assert set(summary.stain_check) == {"ok"}  # the stain check's column reaches the batch
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["a_CD8.parquet", "b_CD8.parquet"]

    # another slide of the same name may not replace a finished one without --force
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(small_slides / "b_CD8.tif", other / "a_CD8.tif")
    taken = cli("batch", other, "-o", out, "--config", cfg, "--workers", "1")
    assert taken.returncode == 1
    errors = pd.read_csv(out / "errors.csv")
    assert errors.error_type.tolist() == ["OutputTaken"]
    assert json.loads((out / "a_CD8" / "batch.json").read_text())["path"] == str(
        small_slides / "a_CD8.tif"
    )
    assert set(pd.read_csv(out / "summary.csv").slide_id) == {"a_CD8", "b_CD8"}


# ----------------------------------------------------------------------------------------------
# 5, 6. score: the output is checked before the work, locked, and replaced only when whole


def test_score_output_naming_a_file_or_an_impossible_place(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    one_line_error(cli("score", SLIDE, "-o", afile), str(afile), "is a file", "-o")
    one_line_error(cli("score", SLIDE, "-o", afile / "sub"), "is a file, not a folder")
    assert afile.read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_score_output_in_an_unwritable_folder_is_refused_before_the_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(cli("score", SLIDE, "-o", locked / "o"), "cannot write")
    finally:
        locked.chmod(0o700)


def test_score_refuses_a_folder_another_run_is_writing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".score.lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # alive: us
    one_line_error(cli("score", SLIDE, "-o", out), "another `tilscore score`", "is writing here")


def test_score_refuses_a_batch_output_folder(tmp_path):
    out = tmp_path / "res"
    (out / "s1").mkdir(parents=True)
    (out / "s1" / "batch.json").write_text("{}")
    (out / "summary.csv").write_text("batch summary")
    one_line_error(cli("score", SLIDE, "-o", out), "results of a batch")
    assert (out / "summary.csv").read_text() == "batch summary"


@pytest.mark.slow
def test_failed_rescore_leaves_the_old_folder_as_it_was(small_slides, tmp_path):
    out = tmp_path / "out"
    slide = small_slides / "a_CD8.tif"
    ok = cli("score", slide, "-o", out, "--config", _config(small_slides))
    assert ok.returncode == 0, ok.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"summary.csv", "run.json", "cells.parquet"} <= set(before)
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                   '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [NaN, 1], [1, 1], '
                   '[0, 0]]]}, "properties": {}}]}')  # fmt: skip
    failed = cli("score", slide, "-o", out, "--regions", bad, "--config", _config(small_slides))
    one_line_error(failed, str(bad), "not a finite number")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_staged_save_keeps_old_files_when_writing_fails(tmp_path):
    import errno

    from tilscore.errors import ConfigError
    from tilscore.outdir import staged_save

    (tmp_path / "summary.csv").write_text("old")
    (tmp_path / "report.html").write_text("old report")
    (tmp_path / "notes.txt").write_text("the user's")

    def disk_full(stage: Path) -> dict[str, Path]:
        (stage / "summary.csv").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ConfigError, match="No space left"):
        staged_save(tmp_path, disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.html", "summary.csv"]
    assert (tmp_path / "summary.csv").read_text() == "old"

    def new(stage: Path) -> dict[str, Path]:
        (stage / "summary.csv").write_text("new")
        return {"summary": stage / "summary.csv"}

    files = staged_save(tmp_path, new)
    assert files == {"summary": tmp_path / "summary.csv"}
    # the old report of the earlier run does not stay beside the new summary; the user's file does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "summary.csv"]


# ----------------------------------------------------------------------------------------------
# 7. implausible µm/px; a per-slide time limit in batch


@pytest.mark.parametrize("mpp", ["40", "1e9", "0.001"])
def test_implausible_mpp_is_refused_at_once(tmp_path, mpp):
    t0 = time.monotonic()
    line = one_line_error(cli("score", SLIDE, "--mpp", mpp, "-o", tmp_path / "o"), "--mpp")
    assert "not plausible" in line
    assert "magnification" in line
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "o").exists()


def test_implausible_mpp_from_the_file_is_refused(tmp_path):
    import numpy as np
    import tifffile

    path = tmp_path / "field.tif"
    # 1 px per 40 µm written in the resolution tags (a magnification mistaken for a size)
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), resolution=(250.0, 250.0),
                     resolutionunit="CENTIMETER")  # fmt: skip
    one_line_error(cli("score", path, "-o", tmp_path / "o"), str(path), "not a plausible", "--mpp")


def test_batch_slide_time_limit_stops_the_slide_and_records_it():
    from tilscore.batch import SlideTimeLimit, _time_limit

    def stepping() -> None:
        with _time_limit(0.2, Path("x.svs")) as check:
            for i in range(100):
                time.sleep(0.05)
                check(i)

    def silent() -> None:
        with _time_limit(0.2, Path("x.svs")):
            while True:
                sum(range(1000))

    with pytest.raises(SlideTimeLimit, match=r"x\.svs.*time limit"):  # checked at each step
        stepping()
    t0 = time.monotonic()
    with pytest.raises(SlideTimeLimit, match=r"x\.svs"):  # a stage that yields no step
        silent()
    assert time.monotonic() - t0 < 10


@pytest.mark.slow
def test_batch_time_limit_records_a_failure_and_moves_on(small_slides, tmp_path):
    cfg = tmp_path / "limit.toml"
    cfg.write_text(FAST_TOML + "[batch]\nslide_time_limit_s = 0.01\n")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(small_slides / "a_CD8.tif", folder / "a_CD8.tif")
    _crafted_tiff(folder / "crafted_CD8.tif", 20000, 10000)  # tifffile logs a warning on it
    os.mkfifo(folder / "pipe_CD8.tif")  # would block the batch if it were read
    out = tmp_path / "res"
    proc = cli("batch", folder, "-o", out, "--config", cfg, "--workers", "1", timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = pd.read_csv(out / "errors.csv").set_index("slide_id")
    assert errors.error_type.to_dict() == {
        "a_CD8": "SlideTimeLimit",
        "crafted_CD8": "SlideReadError",
        "pipe_CD8": "SlideReadError",
    }
    assert "slide_time_limit_s" in errors.message["a_CD8"]
    assert proc.stderr.strip() == ""  # the workers' third-party log lines stay off the terminal


# ----------------------------------------------------------------------------------------------
# 8. a crafted TIFF header costs nothing


def _crafted_tiff(path: Path, width: int, height: int) -> Path:
    """A TIFF of a few hundred bytes whose header claims one deflate strip of width x height."""
    import struct

    import numpy as np
    import tifffile

    tifffile.imwrite(path, np.full((16, 16, 3), 200, np.uint8), photometric="rgb",
                     rowsperstrip=16, compression="zlib", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")  # fmt: skip
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for code, value in ((256, width), (257, height), (278, height)):
            tag = tags[code]
            struct.pack_into({3: "<H", 4: "<I"}[int(tag.dtype)], data, tag.valueoffset, value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("size", "needle"),
    [((1_000_000, 1_000_000), "too large to decode"), ((20000, 10000), "header is corrupt")],
)
@pytest.mark.parametrize("command", ["info", "stain-qc", "score"])
def test_crafted_tiff_header_is_refused_before_allocating(tmp_path, size, needle, command):
    path = _crafted_tiff(tmp_path / "crafted.tif", *size)
    assert path.stat().st_size < 2000
    args = [command, path] + ([] if command == "info" else ["-o", tmp_path / "o"])
    # a 3 GB address-space cap: an attempt to allocate the claimed pixels (11 GB and more)
    # would fail with a MemoryError instead of the clear error
    proc = cli(*args, preexec_fn=_limit_memory(3 << 30))
    one_line_error(proc, str(path), needle)


def _limit_memory(nbytes: int):
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))

    return limit


def test_slide_larger_than_any_glass_slide_is_refused(tmp_path):
    import numpy as np

    from tilscore.errors import SlideReadError
    from tilscore.slide import Slide, _ArrayBackend

    wide = np.zeros((4, 100_000, 3), np.uint8)  # 400 mm wide at 4 µm/px
    with pytest.raises(SlideReadError, match="larger than any glass slide"):
        Slide(tmp_path / "x", _ArrayBackend(wide, "x"), mpp=4.0)
    assert Slide(tmp_path / "x", _ArrayBackend(wide, "x"), mpp=2.0).dimensions == (100_000, 4)


# ----------------------------------------------------------------------------------------------
# 3. a DICOM slide (a folder) is hashed for the provenance


def test_a_folder_is_hashed_file_by_file(tmp_path):
    from tilscore.score import file_sha256

    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "1.dcm").write_bytes(b"one")
    (a / "sub" / "2.dcm").write_bytes(b"two")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert file_sha256(a) == file_sha256(b)
    (b / "sub" / "2.dcm").write_bytes(b"tw0")
    assert file_sha256(a) != file_sha256(b)


@pytest.mark.slow
@pytest.mark.shared_data
def test_dicom_folder_is_scored(shared_data, tmp_path):
    folder = shared_data / "wsi-samples" / "dicom-wsi" / "nema-wg26-BPAEC-partial"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    pytest.importorskip("wsidicom")
    cfg = tmp_path / "fast.toml"
    cfg.write_text(FAST_TOML)
    # a fluorescence image: refused by the stain check, scored when forced
    one_line_error(cli("score", folder, "-o", tmp_path / "r", "--config", cfg), "fluorescence")
    proc = cli("score", folder, "-o", tmp_path / "o", "--config", cfg, "--force-stain")
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert len(run["slide"]["file_sha256"]) == 64
    assert run["slide"]["file_size"] > 1_000_000


# ----------------------------------------------------------------------------------------------
# 1. an image that is not DAB IHC


@pytest.mark.shared_data
def test_he_slide_is_refused_unless_forced(shared_data, tmp_path):
    he = shared_data / "wsi-samples" / "aperio-svs" / "CMU-1-Small-Region.svs"
    if not he.is_file():
        pytest.skip(f"{he} not found")
    line = one_line_error(cli("score", he, "--marker", "CD8", "-o", tmp_path / "o"), str(he))
    assert "H&E" in line
    assert "--force-stain" in line
    assert not (tmp_path / "o").exists()


def test_stain_check_refuses_or_warns(recwarn):
    from tilscore.errors import TilscoreWarning
    from tilscore.stain_check import StainCheck, StainCheckError, apply_stain_check

    refuse = StainCheck("refuse", "pink")
    with pytest.raises(StainCheckError, match="--force-stain"):
        apply_stain_check(refuse, "refuse", "x.svs")
    assert apply_stain_check(refuse, "warn", "x.svs") == "forced"
    assert apply_stain_check(StainCheck("doubt", "pinkish"), "refuse", "x.svs") == "doubt"
    assert apply_stain_check(StainCheck("ok"), "refuse", "x.svs") == "ok"
    assert [str(w.message) for w in recwarn if w.category is TilscoreWarning] == [
        "x.svs: scored although pink",
        "x.svs: stain doubt: pinkish",
    ]


@pytest.mark.parametrize("kind", ["greyscale", "fluorescence"])
def test_greyscale_and_fluorescence_images_are_refused(tmp_path, kind):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    if kind == "greyscale":
        grey = rng.integers(60, 250, (512, 512), dtype=np.uint8)
        image = np.repeat(grey[..., None], 3, axis=2)
    else:  # dim blue nuclei on black
        image = np.zeros((512, 512, 3), np.uint8)
        image[..., 2] = rng.integers(0, 30, (512, 512), dtype=np.uint8)
        image[100:140, 100:140, 2] = 200
    path = tmp_path / f"{kind}.png"
    Image.fromarray(image).save(path)
    line = one_line_error(cli("score", path, "--mpp", "0.5", "-o", tmp_path / "o"), str(path))
    assert kind in line


@pytest.mark.shared_data
def test_real_ihc_images_are_not_doubted(shared_data):
    """Every real DAB IHC image of ../shared/data that these sets hold passes the check."""
    import warnings

    from tilscore.qc import slide_stain_qc
    from tilscore.slide import open_slide
    from tilscore.stain_check import check_stains

    files = sorted((shared_data / "deepliif-ki67" / "labeled").glob("*_ihc.png"))
    files += sorted((shared_data / "nuclick-ihc-lyon19" / "images").glob("*.jpg"))[:4]
    files += sorted((shared_data / "endonuke-ihc" / "images").glob("*.png"))[:4]
    files += sorted((shared_data / "unlabeled-ihc").glob("*.png"))
    files += sorted((shared_data / "ki67-points-dlubak" / "unlabeled").glob("*.png"))
    if not files:
        pytest.skip("no real IHC images found")
    verdicts = {}
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_slide(path, mpp=0.5) as slide:
                verdicts[path.name] = check_stains(slide_stain_qc(slide)).verdict
    for path in sorted(EXAMPLES.glob("*.tif")):
        with open_slide(path) as slide:
            verdicts[path.name] = check_stains(slide_stain_qc(slide)).verdict
    assert {k: v for k, v in verdicts.items() if v != "ok"} == {}


# ----------------------------------------------------------------------------------------------
# 2. regions in the wrong scale


def test_regions_in_another_scale_are_told():
    import shapely

    from tilscore.plausible import regions_scale_mismatch

    tissue = shapely.box(112, 32, 3600, 2640)
    assert regions_scale_mismatch([shapely.box(118, 60, 3599, 2625)], tissue) is None
    small = [shapely.box(1500, 1000, 2000, 1400)]  # a small annotation in the middle: fine
    assert regions_scale_mismatch(small, tissue) is None
    halved = [shapely.box(59, 30, 1800, 1313)]
    assert "multiplied by 2" in regions_scale_mismatch(halved, tissue)
    in_um = [shapely.box(28, 8, 900, 660)]  # level-0 px x 0.25 µm/px
    assert "multiplied by 4" in regions_scale_mismatch(in_um, tissue)


@pytest.mark.slow
def test_score_warns_about_halved_regions(tmp_path):
    data = json.loads((EXAMPLES / "synthetic_cd8.regions.geojson").read_text())

    def halve(c):
        return [v / 2 for v in c] if isinstance(c[0], (int, float)) else [halve(x) for x in c]

    for feature in data["features"]:
        feature["geometry"]["coordinates"] = halve(feature["geometry"]["coordinates"])
    regions = tmp_path / "half.geojson"
    regions.write_text(json.dumps(data))
    cfg = tmp_path / "fast.toml"
    cfg.write_text(FAST_TOML)
    proc = cli("score", SLIDE, "--regions", regions, "-o", tmp_path / "o", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1
    assert "multiplied by 2" in warning[0]
    assert "multiplied by" in (tmp_path / "o" / "run.json").read_text()


# ----------------------------------------------------------------------------------------------
# the family: every expected failure is one line and exit 2; a bug is one line and a saved file


def test_family_of_bad_inputs_is_one_line_exit_2(tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    nested = tmp_path / "nested.geojson"
    nested.write_text('{"type": "FeatureCollection", "features": ' + "[" * 50_000 + "]" * 50_000
                      + "}")  # fmt: skip
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("a = " + "[" * 50_000 + "]" * 50_000)
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (("score", SLIDE, "-o", tmp_path / "o", "--config", folder), "folder"),
        (("score", SLIDE, "-o", tmp_path / "o", "--regions", nested), "nested.geojson: the JSON"),
        (("score", SLIDE, "-o", tmp_path / "o", "--config", deep_toml), "deep.toml: the TOML"),
        (("detect", SLIDE, "--region", "0,0,inf,100", "-o", tmp_path / "c.csv"), "finite"),
        (("detect", SLIDE, "-o", afile / "c.csv"), "is a file"),
        (("score", fifo, "--mpp", "0.5", "-o", tmp_path / "o"), "not a regular file"),
        (("stain-qc", SLIDE, "-o", afile), "is a file"),
        (("batch", SLIDE, "-o", afile), "is a file"),
        (("cohort", afile, "-o", afile), "is a file"),
        (("score", SLIDE, "--mpp", "0", "-o", tmp_path / "o"), "--help"),  # a usage error
    ]
    for args, needle in cases:
        one_line_error(cli(*args, timeout=120), needle)
    assert not (tmp_path / "o").exists()  # nothing left behind by the failed runs


def test_a_bug_is_one_line_with_the_saved_traceback(capsys, monkeypatch, tmp_path):
    import tempfile

    from tilscore.failsafe import EXIT_INTERNAL, run_command

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def buggy() -> int:
        import logging

        logging.getLogger("somelib").warning("a third-party line")
        raise ValueError("a bug\nover two lines")

    assert run_command("score", buggy) == EXIT_INTERNAL
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "internal error: ValueError: a bug over two lines" in err
    saved = next(tmp_path.glob("tilscore-error-*.txt"))
    assert str(saved) in err
    text = saved.read_text()
    assert "Traceback" in text
    assert "a third-party line" in text  # kept in the file, not on the terminal


def test_cohort_says_which_values_it_cannot_use(tmp_path):
    rows = ["slide_id,marker,compartment,pct_positive,patient,timepoint"]
    for p in range(4):
        rows.append(f"s{p}a,CD8,tissue,{10 + p},P{p},pre")
        rows.append(f"s{p}b,CD8,tissue,{'inf' if p == 0 else 20 + p},P{p},post")
        rows.append(f"s{p}c,CD8,tissue,{30 + p},P{p},surgery")
    summary = tmp_path / "summary.csv"
    summary.write_text("\n".join(rows) + "\n")
    proc = cli("cohort", summary, "-o", tmp_path / "c", "--metric", "pct_positive")
    assert proc.returncode == 0, proc.stderr
    printed = " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines
    assert "infinite value" in printed
    assert "'surgery'" in printed
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_local_cluster_listens_on_this_machine_only():
    psutil = pytest.importorskip("psutil")
    from tilscore.batch import _client

    with _client(None, 1, 1, "auto", True) as client:
        me = psutil.Process()
        listening = {
            con.laddr.ip
            for proc in [me, *me.children(recursive=True)]
            for con in proc.net_connections(kind="inet")
            if con.status == psutil.CONN_LISTEN
        }
        assert client.dashboard_link is None or "127.0.0.1" in client.dashboard_link
    assert listening
    assert listening <= {"127.0.0.1"}
