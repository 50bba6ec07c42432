"""The ``tilscore`` command: info, stain-qc, demo, and one clear line for bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from tilscore.cli import main
from tilscore.demo import REPO_EXAMPLES, find_example_slides, run_demo
from tilscore.synthetic import make_synthetic_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cd8.tif"
    make_synthetic_slide(path, marker="CD8", width_px=1200, height_px=900, seed=3)
    return path


def test_info_prints_pixel_size_and_levels(slide_path, capsys, tmp_path):
    thumb = tmp_path / "thumb.png"
    assert main(["info", str(slide_path), "--thumbnail", str(thumb)]) == 0
    out = capsys.readouterr().out
    assert "0.5000 µm/px" in out
    assert "1200 x 900 px" in out
    assert thumb.stat().st_size > 0


def test_info_json_is_machine_readable(slide_path, capsys):
    assert main(["info", str(slide_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == pytest.approx(0.5)
    assert info["vendor"] == "aperio"


def test_mpp_option_overrides_the_file(slide_path, capsys):
    assert main(["info", str(slide_path), "--json", "--mpp", "0.25"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == pytest.approx(0.25)
    assert info["mpp_source"] == "user"


def test_stain_qc_writes_its_outputs(slide_path, tmp_path, capsys):
    assert main(["stain-qc", str(slide_path), "-o", str(tmp_path / "qc")]) == 0
    names = {p.name for p in (tmp_path / "qc").iterdir()}
    assert {"stain.json", "tissue.png", "hematoxylin.png", "dab.png"} <= names
    assert "background I0" in capsys.readouterr().out


def _bad_path(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "missing.svs", "no such file"
    if kind == "directory":
        return tmp_path, "directory"
    if kind == "text-file":
        path = tmp_path / "notes.svs"
        path.write_text("not a slide")
        return path, "notes.svs"
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    return path, "empty.tif"


@pytest.mark.parametrize("kind", ["missing", "directory", "text-file", "zero-bytes"])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, kind):
    path, expected = _bad_path(tmp_path, kind)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert expected in err
    assert "Traceback" not in err


def test_image_without_pixel_size_says_how_to_pass_it(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    png = tmp_path / "field.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    assert main(["info", str(png)]) == 2
    err = capsys.readouterr().err
    assert "--mpp" in err
    assert main(["info", str(png), "--mpp", "0.5"]) == 0


def test_help_of_every_command_prints(capsys):
    # argparse formats help strings with %, so a stray "%" only fails when --help is asked for
    from tilscore.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for argv in [["--help"]] + [[name, "--help"] for name in sub.choices]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, argv
        assert "usage: tilscore" in capsys.readouterr().out, argv


def test_invalid_mpp_is_rejected_by_the_parser(slide_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", str(slide_path), "--mpp", "-1"])
    assert exc.value.code == 2
    assert "positive" in capsys.readouterr().err


def test_console_script_runs_as_a_module(slide_path):
    # the installed entry point and `python -m tilscore` share main(); a subprocess proves no
    # traceback reaches the terminal for bad input
    proc = subprocess.run(
        [sys.executable, "-m", "tilscore", "info", str(slide_path.parent / "nope.svs")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nope.svs" in proc.stderr


@pytest.mark.slow
def test_demo_runs_on_the_bundled_example_slides(tmp_path):
    import pandas as pd

    slides = find_example_slides()
    assert {p.name for p in slides} == {
        "synthetic_cd8.tif",
        "synthetic_cd68.tif",
        "synthetic_cd56.tif",
    }
    summaries = run_demo(tmp_path)
    assert len(summaries) == 3
    for s in summaries:
        assert s["mpp"] == pytest.approx(0.5)
        # about half of each example slide is tissue (4000 x 3000 px at 0.5 µm/px = 3 mm²)
        assert 1.2 < s["tissue_area_mm2"] < 1.8
        assert (tmp_path / s["slide"].split(".")[0] / "stain.json").exists()
        folder = tmp_path / s["slide"].split(".")[0]
        for name in ("summary.csv", "cells.parquet", "cells.geojson", "report.html", "run.json"):
            assert (folder / name).exists(), name
        # scored with the slide's marker and annotations, compared with the slide's own truth
        assert s["marker"] in ("CD8", "CD68", "CD56")
        assert s["regions"].endswith(".regions.geojson")
        assert s["truth"]["f1_cells"] > 0.9
        for comp in ("intratumoral", "stromal"):
            got, truth = s["compartments"][comp], s["truth"][comp]
            assert abs(got["pct_positive"] - truth["pct_positive"]) < 2
    table = pd.read_csv(tmp_path / "summary.csv")
    assert len(table) == 3 * 5
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == summaries


def test_demo_without_slides_says_how_to_make_them(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "out"), "--slides", str(tmp_path)]) == 2
    assert "python -m tilscore.synthetic examples" in capsys.readouterr().err


def test_example_slides_are_what_the_generator_makes(tmp_path):
    """The committed example truth is current: regenerating one slide's layout reproduces it."""
    import pandas as pd

    from tilscore.synthetic import EXAMPLES, make_layout

    marker, seed = EXAMPLES["synthetic_cd8"]
    layout = make_layout(marker=marker, width_px=4000, height_px=3000, mpp=0.5, seed=seed)
    committed = pd.read_csv(REPO_EXAMPLES / "synthetic_cd8.cells.csv")
    truth = layout.truth()
    assert len(committed) == len(truth)
    assert (committed["positive"].to_numpy() == truth["positive"].to_numpy()).all()
    assert committed["x"].to_numpy() == pytest.approx(truth["x"].to_numpy(), abs=1e-3)


def test_detect_then_evaluate_against_the_truth(slide_path, tmp_path, capsys):
    cells_csv = tmp_path / "cells.csv"
    code = main(
        ["detect", str(slide_path), "--detector", "classical", "--marker", "CD8",
         "-o", str(cells_csv)]
    )  # fmt: skip
    assert code == 0
    assert "CD8-positive" in capsys.readouterr().out
    truth = slide_path.with_name("cd8.cells.csv")
    metrics_json = tmp_path / "m.json"
    args = ["evaluate", "--pred", str(cells_csv), "--truth", str(truth), "-o", str(metrics_json)]
    assert main(args) == 0
    assert "F1" in capsys.readouterr().out
    m = json.loads(metrics_json.read_text())
    assert m["radius_um"] == 4.0
    assert m["f1"] > 0.6
    assert m["pos_n_truth"] > 0


def test_detect_writes_geojson_and_parquet(slide_path, tmp_path):
    import pandas as pd

    gj, pq = tmp_path / "cells.geojson", tmp_path / "cells.parquet"
    base = ["detect", str(slide_path), "--detector", "classical", "--region", "0,0,600,450"]
    assert main([*base, "-o", str(gj)]) == 0
    assert main([*base, "--set", "threshold_od=0.5", "-o", str(pq)]) == 0
    features = json.loads(gj.read_text())["features"]
    assert features
    assert all(f["properties"]["objectType"] == "detection" for f in features)
    assert {f["properties"]["classification"]["name"] for f in features} <= {"Positive", "Negative"}
    table = pd.read_parquet(pq)
    assert len(table) == len(features)
    # a stricter threshold never adds positives
    n_pos_default = sum(f["properties"]["classification"]["name"] == "Positive" for f in features)
    assert table["positive"].sum() <= n_pos_default


def test_detect_bad_options_are_one_line(slide_path, tmp_path, capsys):
    out = str(tmp_path / "c.csv")
    assert main(["detect", str(slide_path), "--marker", "CD999", "-o", out]) == 2
    assert "CD8" in capsys.readouterr().err  # lists the known markers
    assert main(["detect", str(slide_path), "--set", "threshold_od=nan", "-o", out]) == 2
    assert "threshold_od" in capsys.readouterr().err
    assert main(["detect", str(slide_path), "-o", str(tmp_path / "c.xlsx")]) == 2
    assert ".geojson" in capsys.readouterr().err


def test_score_command_writes_the_outputs_and_prints_the_table(tmp_path, capsys):
    slide = REPO_EXAMPLES / "synthetic_cd56.tif"
    regions = REPO_EXAMPLES / "synthetic_cd56.regions.geojson"
    out = tmp_path / "scored"
    code = main(
        ["score", str(slide), "--marker", "CD56", "--regions", str(regions),
         "--set", "threshold_od=0.2", "-o", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "intratumoral" in printed
    assert "stromal" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["detection"]["marker"]["threshold_od"] == 0.2
    assert (out / "report.html").stat().st_size > 10_000


def test_score_command_bad_regions_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{oops")
    slide = REPO_EXAMPLES / "synthetic_cd8.tif"
    assert main(["score", str(slide), "--regions", str(bad), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.geojson" in err
    assert "not valid JSON" in err
