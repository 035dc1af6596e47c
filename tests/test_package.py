"""The package's promises: a torch-free runtime import and a command line that loads lazily."""

from __future__ import annotations

import subprocess
import sys

from dereflect.cli import build_parser, main


def test_runtime_import_and_cli_parser_import_no_torch():
    code = ("import sys, dereflect, dereflect.remover, dereflect.cli; dereflect.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'onnx', 'tensorrt', 'sklearn') if m in sys.modules]; "
            "sys.exit(f'imported: {heavy}' if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_every_command_is_registered(capsys):
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert {"remove", "video", "eval", "bench", "train", "weights", "export"} <= commands
    assert main([]) == 2
    assert "remove" in capsys.readouterr().out


def test_bundled_models_are_in_the_package():
    from dereflect.manifest import load_manifest
    from dereflect.models import BUNDLED_MODELS, BUNDLED_MODELS_DIR

    for name in BUNDLED_MODELS:
        manifest = load_manifest(BUNDLED_MODELS_DIR / name)  # checks every file's SHA-256
        assert manifest.name == name
        metadata = manifest.checkpoint["metadata"]
        assert metadata["step"] > 0 and metadata["training"]["hardware"]
