"""The command line as a whole: help text and defaults of every option, exit codes, install hints,
and the export commands on the bundled models.

Needs neither torch nor TensorRT: the bundled models run on ONNX Runtime; hand-made ONNX files
stand in where a command must fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import Terminal
from dereflect.cli import EPILOG, DefaultsHelpFormatter, build_parser, iter_parsers, main
from dereflect.models import BUNDLED_MODELS_DIR
from onnx import TensorProto, helper

HAS_BUNDLED = (BUNDLED_MODELS_DIR / "rm2s-lite" / "manifest.json").is_file()
FLAGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _options():
    """(parser, action) for every argument of every command and sub-command."""
    for parser in iter_parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, FLAGS):
                yield parser, action


def _default_texts(default) -> set:
    """How a default may be written in help: as is, with thousands separators, or to 3 significant digits."""
    texts = {str(default)}
    if isinstance(default, int) and not isinstance(default, bool):
        texts.add(f"{default:,}")
    if isinstance(default, float):
        texts |= {f"{default:g}", f"{default:.3g}"}
    return texts


def test_every_command_is_walked():
    progs = {parser.prog for parser in iter_parsers(build_parser())}
    for command in ("remove", "video", "eval", "bench", "train rm2s-stage1", "train rm2s-stage2", "train crrn",
                    "train synthesize", "weights vgg", "export onnx", "export engine", "export verify",
                    "export check"):
        assert f"dereflect {command}" in progs


def test_every_option_has_help_that_shows_its_default():
    missing_help, missing_default, wrong_default = [], [], []
    for parser, action in _options():
        name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        if not (action.help or "").strip():
            missing_help.append(name)
            continue
        if not action.option_strings or action.nargs == 0 or action.required:
            continue  # positionals, flags and required options have no default to show
        rendered = parser._get_formatter()._expand_help(action)
        if "default" not in rendered.lower():
            missing_default.append(name)
        elif action.default not in (None, []) and not any(t in rendered for t in _default_texts(action.default)):
            wrong_default.append(f"{name}: default {action.default!r}, help says {rendered!r}")
    assert not missing_help, missing_help
    assert not missing_default, missing_default
    assert not wrong_default, wrong_default


def test_one_formatter_for_every_command():
    parsers = list(iter_parsers(build_parser()))
    assert len(parsers) > 15
    for parser in parsers:
        assert issubclass(parser.formatter_class, DefaultsHelpFormatter), parser.prog
        parser.format_help()  # every help string formats (no stray % in it)
    steps = next(p for p in parsers if p.prog == "dereflect train rm2s-stage1").format_help()
    for flag in ("--steps N", "--batch-size N", "--seed SEED", "--lr LR", "--workers N", "--val-every N"):
        assert flag in steps
    assert "(default: 2000)" in steps and "(default: 6)" in steps


def test_top_level_help_documents_exit_codes_and_the_cache(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.count("exit status") == 1 and EPILOG.splitlines()[1].strip() in out
    for code, words in (("0", "everything asked was done"), ("1", "some items failed"), ("2", "usage error")):
        assert any(line.split()[:1] == [code] and words in line for line in out.splitlines()), code


@pytest.mark.parametrize("command", [["train"], ["train", "rm2s-stage1"], ["weights"], ["weights", "vgg"],
                                     ["export", "engine"]])
def test_dereflect_cache_is_documented_where_it_is_used(command):
    parser = next(p for p in iter_parsers(build_parser()) if p.prog == "dereflect " + " ".join(command))
    assert "$DEREFLECT_CACHE" in parser.format_help()


# --- exit codes ----------------------------------------------------------------------------------

def _bad_onnx(path: Path) -> Path:
    """An ONNX file no TensorRT parses (a Unique node)."""
    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"])], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_exit_codes(tmp_path, capsys):
    assert main([]) == 2  # nothing asked: help, nothing done
    assert main(["export"]) == 2
    assert main(["export", "verify", str(tmp_path / "missing")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing"), "--sizes", "16"]) == 2
    with pytest.raises(SystemExit) as stop:
        main(["bench"])  # argparse: MODEL missing
    assert stop.value.code == 2
    assert main(["export", "check", str(_bad_onnx(tmp_path / "bad.onnx"))]) == 1  # the check ran and failed
    assert "Unique" in capsys.readouterr().out


def test_weights_vgg_without_torch_prints_the_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["weights", "vgg", "--source", "hed"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'dereflect[train]'" in err and "Traceback" not in err


def test_engine_without_tensorrt_prints_the_install_hint_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "engine", "rm2s-lite", "-o", "rm2s-engines", "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'dereflect[trt]'" in err and "JetPack" in err
    assert list(tmp_path.iterdir()) == []


# --- the bundled models by name -------------------------------------------------------------------

@pytest.mark.skipif(not HAS_BUNDLED, reason="this installation lacks the bundled models")
def test_export_verify_takes_a_bundled_name(capsys):
    assert main(["export", "verify", "rm2s-lite", "--backend", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "result: PASS" in out and "pass limit: PSNR >= 80 dB" in out
    if "golden" not in (BUNDLED_MODELS_DIR / "rm2s-lite" / "manifest.json").read_text():
        # Without goldens the note says what is missing and how to get them, not that the install is broken.
        assert "ships without golden files (nothing is wrong with this installation)" in out
        assert "dereflect export engine rm2s-lite -o DIR" in out


@pytest.mark.skipif(not HAS_BUNDLED or importlib.util.find_spec("onnx") is None,
                    reason="needs the bundled models and onnx")
def test_export_check_takes_a_bundled_name(capsys):
    assert main(["export", "check", "rm2s-lite"]) == 0
    out = capsys.readouterr().out
    assert "models/rm2s-lite/stage1.onnx" in out and "TensorRT 8.5: OK" in out


# --- remove: what is checked before the model runs, exit codes, progress ---------------------------

class _IdentityRemover:
    """Stands in for the model: gives the image back, and counts the images it was given."""

    def __init__(self) -> None:
        self.images = 0

    def remove(self, image, colour_order="BGR", progress=None):
        self.images += 1
        return image.copy()


@pytest.fixture
def identity(monkeypatch):
    """The remover ``dereflect remove`` opens, and how many times it was opened (``opened``)."""
    import dereflect.cli_runtime as runtime

    remover = _IdentityRemover()
    remover.opened = 0

    def opened(args, **overrides):
        remover.opened += 1
        return remover

    monkeypatch.setattr(runtime, "open_from_args", opened)
    return remover


def _image(path: Path, array=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8) if array is None else array
    assert cv2.imwrite(str(path), array)
    return path


@pytest.mark.parametrize("names, written_twice", [
    (["a.jpg", "a.png", "a.reflection.png"], "a.reflection.png"),  # two outputs' intermediates (a.jpg's, a.png's)
    (["a.jpg", "a.reflection.png"], "a.reflection.png"),  # an intermediate and another image's output
])
def test_remove_refuses_intermediates_written_twice_before_any_work(tmp_path, identity, capsys, names,
                                                                     written_twice):
    for name in names:
        _image(tmp_path / "in" / name)
    out = tmp_path / "out"
    for overwrite in ([], ["--overwrite"]):
        assert main(["remove", str(tmp_path / "in"), "-o", str(out), "--save-intermediates", *overwrite]) == 2
        err = capsys.readouterr().err
        assert f"would both be written to {out / written_twice}" in err and "rename one" in err, err
        assert "--save-intermediates writes NAME.KEY.png" in err
    assert not out.exists() and identity.opened == 0
    # Without intermediates each image has a file of its own.
    assert main(["remove", str(tmp_path / "in"), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_m_is_the_short_form_of_model_wherever_model_is_an_option(tmp_path, identity, monkeypatch):
    """`dereflect remove -m DIR photo.jpg` said "unrecognized arguments: -m"."""
    import dereflect.cli_runtime as runtime

    seen = []
    opened = runtime.open_from_args

    def recording(args, **overrides):
        seen.append(args.model)
        return opened(args, **overrides)

    monkeypatch.setattr(runtime, "open_from_args", recording)
    photo = _image(tmp_path / "photo.jpg")
    assert main(["remove", "-m", "my-export", str(photo), "-o", str(tmp_path / "out.png"), "-q"]) == 0
    assert seen == ["my-export"] and (tmp_path / "out.png").is_file()
    # Every command with --model takes -m for it, and -m means nothing else anywhere.
    with_model = [parser for parser in iter_parsers(build_parser())
                  if any("--model" in action.option_strings for action in parser._actions)]
    assert {parser.prog for parser in with_model} >= {"dereflect remove", "dereflect video"}
    for parser in iter_parsers(build_parser()):
        for action in parser._actions:
            if "-m" in action.option_strings:
                assert action.option_strings == ["-m", "--model"], parser.prog
    for parser in with_model:
        model = next(action for action in parser._actions if "--model" in action.option_strings)
        assert "-m" in model.option_strings, parser.prog


def test_remove_with_nothing_left_to_do_succeeds_but_one_file_asked_for_does_not(tmp_path, identity, capsys):
    folder = tmp_path / "in"
    for name in ("a.png", "b.png"):
        _image(folder / name)
    out = tmp_path / "out"
    assert main(["remove", str(folder), "-o", str(out), "-q"]) == 0
    assert identity.images == 2
    capsys.readouterr()
    for quiet in ([], ["-q"]):
        assert main(["remove", str(folder), "-o", str(out), *quiet]) == 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "dereflect: nothing to do: all 2 output(s) exist already" in err, err
        assert "pass --overwrite to replace them" in err and "error" not in err
    assert main(["remove", str(folder / "a.png"), str(folder / "b.png"), "-o", str(out)]) == 0
    assert identity.opened == 1 and identity.images == 2  # no model loaded, nothing run
    # The one file named: it was asked for and is not written.
    for target in (out / "a.png", f"{out}/"):
        assert main(["remove", str(folder / "a.png"), "-o", str(target)]) == 2
        assert f"error: {out / 'a.png'}: file exists; pass --overwrite" in capsys.readouterr().err


def test_remove_refuses_colour_as_pgm_before_the_model_and_opencv_says_nothing(tmp_path, identity, capfd):
    source = _image(tmp_path / "photo.png")
    assert main(["remove", str(source), "-o", str(tmp_path / "out.pgm")]) == 2
    err = capfd.readouterr().err
    assert "out.pgm: .pgm stores grey images only and this image is colour; name the output .ppm" in err
    assert "[ERROR" not in err and identity.images == 0 and not (tmp_path / "out.pgm").exists()
    grey = _image(tmp_path / "grey.png", np.full((12, 16), 90, np.uint8))
    assert main(["remove", str(grey), "-o", str(tmp_path / "grey.pgm"), "-q"]) == 0
    # .ppm holds colour only: a grey image is written as three equal channels.
    assert main(["remove", str(grey), "-o", str(tmp_path / "grey.ppm"), "-q"]) == 0
    assert cv2.imread(str(tmp_path / "grey.ppm"), cv2.IMREAD_UNCHANGED).shape == (12, 16, 3)


def test_remove_keeps_opencv_log_lines_from_the_user(tmp_path, identity, capfd):
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_WARNING)  # OpenCV's default, whatever ran before
    try:
        # libtiff warns (through OpenCV's log) when it reads the four-channel TIFF OpenCV writes.
        bgra = np.dstack([np.zeros((12, 16, 3), np.uint8), np.full((12, 16), 255, np.uint8)])
        source = _image(tmp_path / "alpha.tif", bgra)
        assert main(["remove", str(source), "-o", str(tmp_path / "out.png"), "-q"]) == 0
    finally:
        logging.setLogLevel(level)
    assert capfd.readouterr().err == ""


def test_remove_writes_a_float_tiff_as_float32(tmp_path, identity):
    values = np.random.default_rng(1).random((12, 16, 3)).astype(np.float32)
    source = _image(tmp_path / "f32.tif", values)
    assert main(["remove", str(source), "-o", str(tmp_path / "out" / "f32.tif"), "-q"]) == 0
    back = cv2.imread(str(tmp_path / "out" / "f32.tif"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, values)
    # A format without floats gets 8 bits.
    assert main(["remove", str(source), "-o", str(tmp_path / "out" / "f32.png"), "-q"]) == 0
    assert cv2.imread(str(tmp_path / "out" / "f32.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint8



def test_remove_draws_its_progress_bar_on_a_terminal_only(tmp_path, identity, capsys, monkeypatch):
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / "in" / name)
    assert main(["remove", str(tmp_path / "in"), "-o", str(tmp_path / "log")]) == 0
    err = capsys.readouterr().err  # what a log file would hold
    assert "\r" not in err and "image/s" not in err and "3 image(s) written" in err
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["remove", str(tmp_path / "in"), "-o", str(tmp_path / "tty")]) == 0
    assert "3/3" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_a_folder_with_engines_opened_without_tensorrt_says_how_to_run_them(tmp_path, capsys):
    from onnx_fixtures import make_crrn_export

    model = make_crrn_export(tmp_path / "engines")
    source = _image(tmp_path / "in.png")
    assert main(["remove", str(source), "-o", str(tmp_path / "plain.png"), "--model", str(model)]) == 0
    assert "TensorRT engines" not in capsys.readouterr().err
    network = next(iter(json.loads((model / "manifest.json").read_text())["networks"]))
    (model / f"{network}.engine").write_bytes(b"built on a Jetson")
    assert main(["remove", str(source), "-o", str(tmp_path / "out.png"), "--model", str(model)]) == 0
    err = capsys.readouterr().err
    assert f"holds TensorRT engines ({network}); this run uses onnxruntime: pass --backend tensorrt" in err
