"""The command line as a whole: help text and defaults of every option, exit codes, install hints,
and the export commands on the bundled models.

Needs neither torch nor TensorRT: the bundled models run on ONNX Runtime; hand-made ONNX files
stand in where a command must fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import onnx
import pytest
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
