"""The scripts of benchmarks/ that a lent GPU or a user runs, checked on the CPU: they run to the end
and refuse bad input with one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_smoke_run_writes_its_figures_and_tables(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: its neighbours import
    pytest.importorskip("sklearn", reason="the authors' step uses scikit-learn (pip install 'dereflect[train]')")
    out = tmp_path / "suite"
    # On the CPU the H100 table is a prediction for another machine: no measured / floor ratio.
    assert _script("gpu_suite").main(["--cpu-smoke", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["mode"] == "cpu smoke test" and "error" not in report["presets"]["lite"]
    text = (out / "gpu_suite.md").read_text()
    assert "## lite: cost and floor per stage" in text and "(memory), n/a" in text


def test_tradeoff_variants_run_at_the_models_own_side_unless_told(tmp_path, capsys):
    tradeoff = _script("tradeoff")
    assert tradeoff.parse_variant("crrn-lite") == ("crrn-lite", "model")  # as dereflect remove runs it
    assert tradeoff.parse_variant("crrn-lite@160") == ("crrn-lite", 160)
    # Bad input: one line and exit 2, before any model is timed.
    bad_report = tmp_path / "report.json"
    bad_report.write_text('{"a": 1}')
    for argv, wanted in ((["crrn-lite@abc"], "whole number of pixels"), (["@7"], "names no model"),
                         (["crrn-lite", "nosuch@224"], "model not found: nosuch"),
                         (["crrn-lite", "crrn-lite@10"], "at least 32"),
                         (["crrn-lite", "crrn-lite"], "given twice"),
                         (["crrn-lite", "--runs", "0"], "--runs must be at least 1"),
                         (["crrn-lite", "--quality", "x.json"], "write VARIANT=REPORT.json"),
                         (["crrn-lite", "--quality", f"crrn-lite={tmp_path / 'none.json'}"], "cannot read it"),
                         (["crrn-lite", "--quality", f"crrn-lite={bad_report}"], "not a report.json")):
        assert tradeoff.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == ""  # nothing of the table before the refusal
        assert err.startswith("tradeoff: error: ") and wanted in err and err.count("\n") == 1, err


def test_authors_baseline_refuses_what_it_cannot_compare_with_one_line(capsys):
    pytest.importorskip("torch")
    authors = _script("authors_baseline")
    for argv, wanted in ((["crrn-lite"], "the authors' structure is RM2S's"),
                         (["rm2s-lite", "--runs", "0"], "--runs must be at least 1"),
                         (["rm2s-lite", "--backend", "tensorrt"], "tensorrt backend")):
        assert authors.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("authors_baseline: error: ") and wanted in err and "Traceback" not in err, err


def test_random_export_is_a_command_that_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert _script("random_export").main([str(tmp_path / "taken")]) == 2
    assert "exists; choose a new folder" in capsys.readouterr().err


def test_gpu_suite_refuses_bad_options_with_one_line_before_measuring(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    (tmp_path / "a_file").write_text("mine")
    suite = _script("gpu_suite")
    for argv, wanted in ((["--device-table", "bogus"], "unknown device table 'bogus'"),
                         (["--presets", "huge"], "unknown preset 'huge'"),
                         (["--sizes", "8k"], "size '8k' is not"),
                         (["--out", str(tmp_path / "a_file")], "exists and is not a folder")):
        assert suite.main(["--cpu-smoke", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gpu_suite: error: ") and wanted in err and "Traceback" not in err, err
    assert (tmp_path / "a_file").read_text() == "mine"


def test_temporal_video_prints_every_figure_of_the_readme_and_refuses_a_missing_folder(tmp_path, capsys):
    import cv2
    import numpy as np
    from conftest import smooth_photo
    from onnx_fixtures import make_crrn_export

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        cv2.imwrite(str(photos / f"{name}.png"), smooth_photo(rng, 240, 400))
    model = make_crrn_export(tmp_path / "toy")
    script = _script("temporal_video")
    assert script.main(["--photos", str(photos), "--model", str(model)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "static (40 frames, noise 2, mp4v)", "pan 1 px a frame", "pan 2 px a frame", "pan 4 px a frame",
        "object (10 px a frame)", "cut (frame 20)"]
    assert script.main(["--photos", str(tmp_path / "none")]) == 2
    assert "not a folder of photos" in capsys.readouterr().err
