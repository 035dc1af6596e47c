"""``dereflect eval``: dataset readers on small layouts made here, the resize protocol, region
masks, the baseline row, the report files and the contact sheet, on tiny hand-made ONNX exports.

The toy exports come from test_runtime.py: "CRRN" returns 0.7 I as the background (so the
expected scores are known exactly), "RM2S" squares the input in stage 1 and mixes the
middle step's masks in stage 2 (so it has a stage-1 image and a confidence map).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import dereflect.cli
import numpy as np
import pytest

# The toy ONNX exports live with the runtime tests (to be moved to a shared test helper).
from conftest import Terminal, tiny_rm2s_networks
from dereflect import Remover
from dereflect.errors import InputError, ModelError
from dereflect.tools.datasets import attach_masks, detect_layout, find_pairs, read_ceilnet, read_paired, read_sir2
from dereflect.tools.evaluate import (
    BASELINE_LABEL,
    CONTACT_COLUMNS,
    CONTACT_TILE,
    contact_sheet,
    evaluate,
    load_model,
    load_pair,
    parse_resize,
    resize_short,
)
from dereflect.tools.metrics import best_channel_gains, psnr, reflection_mask, si, si_region, ssim, ssim_region
from onnx_fixtures import make_crrn_export, make_rm2s_export


def _photo(h=40, w=56, seed=0):
    """Smooth shapes plus noise in [0, 1]: real edges for the middle step."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(xx / 5.0 + seed)[:, :, None] * np.cos(yy / 7.0 + seed)[:, :, None]
    base = base + 0.2 * (((xx // 9 + yy // 11) % 2)[:, :, None] - 0.5)
    return np.clip(base + 0.05 * rng.random((h, w, 3)), 0, 1).astype(np.float32)


def _write(path: Path, rgb, grey=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    pixels = pixels if grey else pixels[:, :, ::-1]
    assert cv2.imwrite(str(path), pixels)
    return path


def _read(path: Path) -> np.ndarray:
    return cv2.imread(str(path))[:, :, ::-1].astype(np.float32) / 255.0


def _pair(root: Path, input_path: str, target_path: str, seed: int, size=(40, 56)) -> None:
    """A ground truth and an input that is the ground truth plus a smooth 'reflection'."""
    target = _photo(*size, seed=seed)
    _write(root / target_path, target)
    _write(root / input_path, np.clip(0.8 * target + 0.3 * _photo(*size, seed=seed + 100), 0, 1))


def _names(pairs):
    return [p.name for p in pairs]


@pytest.fixture(scope="module")
def crrn_dir(tmp_path_factory):
    return make_crrn_export(tmp_path_factory.mktemp("crrn"))


@pytest.fixture(scope="module")
def rm2s_dir(tmp_path_factory):
    return make_rm2s_export(tmp_path_factory.mktemp("rm2s"))


@pytest.fixture
def paired(tmp_path):
    root = tmp_path / "real20"
    for i, name in enumerate(("a", "b", "c")):
        _pair(root, f"blended/{name}.png", f"transmission_layer/{name}.png", seed=i)
    return root


# -- readers --------------------------------------------------------------------------------

def test_read_paired_both_folder_names(tmp_path):
    root = tmp_path / "nature"
    _pair(root, "blended/x.jpg", "transmission_layer/x.png", seed=1)  # extensions may differ
    _pair(root, "blended/y.png", "transmission_layer/y.png", seed=2)
    pairs = read_paired(root)
    assert _names(pairs) == ["x", "y"]
    assert pairs[0].input == root / "blended/x.jpg" and pairs[0].target == root / "transmission_layer/x.png"
    assert detect_layout(root) == "paired"

    plain = tmp_path / "plain"
    _pair(plain, "input/p.png", "target/p.png", seed=3)
    assert _names(read_paired(plain)) == ["p"]
    assert find_pairs(plain, "auto")[0] == "paired"
    assert find_pairs(root, "real20")[0] == "real20"


def test_read_paired_mismatches(tmp_path):
    root = tmp_path / "set"
    _pair(root, "blended/a.png", "transmission_layer/a.png", seed=0)
    _write(root / "blended/only_input.png", _photo())
    _write(root / "transmission_layer/only_gt.png", _photo())
    with pytest.raises(InputError, match=r"1 image\(s\) in blended/ without ground truth \(only_input\).*"
                                         r"1 image\(s\) in transmission_layer/ without an input \(only_gt\)"):
        read_paired(root)

    dup = tmp_path / "dup"
    _pair(dup, "blended/a.png", "transmission_layer/a.png", seed=0)
    _write(dup / "blended/a.jpg", _photo())
    with pytest.raises(InputError, match="two images named 'a'"):
        read_paired(dup)

    with pytest.raises(InputError, match="no paired folders"):
        read_paired(tmp_path)
    empty = tmp_path / "empty"
    (empty / "blended").mkdir(parents=True)
    (empty / "transmission_layer").mkdir()
    with pytest.raises(InputError, match="no image pairs"):
        read_paired(empty)


def test_read_ceilnet(tmp_path):
    root = tmp_path / "ceil"
    for i, name in enumerate(("1", "2")):
        _pair(root, f"{name}-input.png", f"{name}-label1.png", seed=i)
        _write(root / f"{name}-label2.png", _photo(seed=9))
    pairs = read_ceilnet(root)
    assert _names(pairs) == ["1", "2"]
    assert pairs[1].input.name == "2-input.png" and pairs[1].target.name == "2-label1.png"
    assert detect_layout(root) == "ceilnet"

    _write(root / "3-input.png", _photo())
    with pytest.raises(InputError, match=r"1 NAME-input file\(s\) without ground truth \(3\)") as some_missing:
        read_ceilnet(root)
    assert "--layout photos" not in str(some_missing.value)
    # photos through glass with no ground truth at all: the message names the layout that looks at them
    photos = tmp_path / "real_photos"
    for i in range(2):
        _write(photos / f"{i}-input.png", _photo(seed=i))
    with pytest.raises(InputError, match=r"2 NAME-input file\(s\) without ground truth.*pass --layout photos"):
        read_ceilnet(photos)
    (tmp_path / "ceil_empty").mkdir()
    with pytest.raises(InputError, match="no NAME-input"):
        read_ceilnet(tmp_path / "ceil_empty")


def test_read_sir2_both_naming_styles(tmp_path):
    root = tmp_path / "SIR2"
    # Repackaged subset: blended/ + transmission_layer/ (+ reflection_layer/, ignored).
    _pair(root, "SolidObjectDataset/blended/s1.png", "SolidObjectDataset/transmission_layer/s1.png", seed=0)
    _write(root / "SolidObjectDataset/reflection_layer/s1.png", _photo())
    # As captured: m/g/r per scene folder, and PREFIX_m / PREFIX_g files.
    _pair(root, "WildSceneDataset/withgt/7/m.jpg", "WildSceneDataset/withgt/7/g.jpg", seed=1)
    _write(root / "WildSceneDataset/withgt/7/r.jpg", _photo())
    _pair(root, "PostcardDataset/F11/3_M.png", "PostcardDataset/F11/3_g.png", seed=2)
    _write(root / "PostcardDataset/F11/3_r.png", _photo())
    pairs = read_sir2(root)
    assert _names(pairs) == ["PostcardDataset/F11/3", "SolidObjectDataset/s1", "WildSceneDataset/withgt/7"]
    by_name = {p.name: p for p in pairs}
    assert by_name["PostcardDataset/F11/3"].input.name == "3_M.png"
    assert by_name["WildSceneDataset/withgt/7"].target.name == "g.jpg"
    assert detect_layout(root) == "sir2"

    _write(root / "WildSceneDataset/withgt/8/m.jpg", _photo())
    with pytest.raises(InputError, match=r"1 mixture file\(s\) \(m\) without ground truth "
                                         r"\(WildSceneDataset/withgt/8\)"):
        read_sir2(root)

    twice = tmp_path / "twice"
    _pair(twice, "X/blended/s.png", "X/transmission_layer/s.png", seed=3)
    _pair(twice, "X/s_m.png", "X/s_g.png", seed=4)
    with pytest.raises(InputError, match=r"image names found twice \(X/s\)"):
        read_sir2(twice)


def test_auto_detection_errors(tmp_path):
    _write(tmp_path / "photo.png", _photo())
    with pytest.raises(InputError, match=r"no known dataset layout.*Looked for.*blended/.*NAME-input.*m\.\*"):
        find_pairs(tmp_path)
    with pytest.raises(InputError, match="data folder not found"):
        find_pairs(tmp_path / "missing")
    with pytest.raises(InputError, match="layout must be one of"):
        find_pairs(tmp_path, layout="voc")


# -- resize protocol and masks --------------------------------------------------------------

def test_parse_resize():
    assert parse_resize("native") is None
    assert parse_resize("short:420") == 420
    assert parse_resize(" Short:300 ") == 300
    for bad in ("420", "short:", "short:-3", "long:300", "short:x"):
        with pytest.raises(InputError, match="'native' or 'short:N'"):
            parse_resize(bad)
    with pytest.raises(InputError, match="too small"):
        parse_resize("short:8")


def test_resize_short_keeps_aspect():
    image = _photo(40, 60)
    assert resize_short(image, None) is image
    assert resize_short(image, 20).shape == (20, 30, 3)  # shrink: INTER_AREA
    big = resize_short(image, 80)  # enlarge: INTER_CUBIC, clipped to [0, 1]
    assert big.shape == (80, 120, 3) and big.min() >= 0 and big.max() <= 1
    area = cv2.resize(image, (30, 20), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(resize_short(image, 20), area)
    tall = resize_short(_photo(61, 40), 20)
    assert tall.shape == (30, 20, 3)  # 61 * 0.5 = 30.5 -> rounded
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    small = resize_short(mask, 20, nearest=True)
    assert small.dtype == bool and small.shape == (20, 30) and small.sum() == 10 * 15


def test_load_pair_resizes_all_three_alike(paired, tmp_path):
    masks = tmp_path / "masks"
    for name in ("a", "b", "c"):
        region = np.zeros((40, 56))
        region[8:24, 10:40] = 1
        _write(masks / f"{name}.png", region, grey=True)
    pairs = attach_masks(read_paired(paired), masks)
    image, target, mask = load_pair(pairs[0], short=20)
    assert image.shape == target.shape == (20, 28, 3) and mask.shape == (20, 28) and mask.dtype == bool
    assert mask.sum() == 8 * 15
    native = load_pair(pairs[0])
    np.testing.assert_allclose(native[1], _read(paired / "transmission_layer/a.png"))

    _write(paired / "transmission_layer/a.png", _photo(40, 50))
    with pytest.raises(InputError, match="a pair must have one size"):
        load_pair(pairs[0])
    _write(masks / "b.png", np.ones((30, 30)), grey=True)
    with pytest.raises(InputError, match="mask .* is 30x30"):
        load_pair(pairs[1])


def test_attach_masks_names_and_errors(tmp_path):
    root = tmp_path / "SIR2"
    _pair(root, "Wild/blended/w.png", "Wild/transmission_layer/w.png", seed=0)
    _pair(root, "Solid/blended/s.png", "Solid/transmission_layer/s.png", seed=1)
    masks = tmp_path / "masks"
    _write(masks / "Wild/w.png", np.ones((40, 56)), grey=True)
    with pytest.raises(InputError, match=r"1 of 2 image\(s\) have no region mask.*Solid/s"):
        find_pairs(root, masks=masks)
    _write(masks / "Solid/s.PNG", np.ones((40, 56)), grey=True)
    _, pairs = find_pairs(root, masks=masks)
    assert [p.mask.relative_to(masks).as_posix() for p in pairs] == ["Solid/s.PNG", "Wild/w.png"]
    with pytest.raises(InputError, match="mask folder not found"):
        find_pairs(root, masks=tmp_path / "nowhere")


# -- evaluation -----------------------------------------------------------------------------

def test_evaluate_scores_baseline_and_model(crrn_dir, paired, tmp_path):
    masks = tmp_path / "masks"
    for name in ("a", "b"):
        region = np.zeros((40, 56))
        region[5:30, 12:44] = 1
        _write(masks / f"{name}.png", region, grey=True)
    _write(masks / "c.png", np.zeros((40, 56)), grey=True)  # empty region: no regional score

    report = evaluate(crrn_dir, paired, masks=masks, out_dir=tmp_path / "out", progress=False)
    assert report.data["layout"] == "paired" and report.data["images"] == 3
    assert report.metrics == ("psnr", "ssim", "si", "ssimr", "sir")
    assert report.model["name"] == "toy-crrn" and report.model["method"] == "crrn"
    assert report.protocol["resize"] == "native"

    for scores, name in zip(report.images, "abc"):
        image = _read(paired / f"blended/{name}.png")
        target = _read(paired / f"transmission_layer/{name}.png")
        output = np.clip(0.7 * image, 0, 1)  # the toy CRRN's background
        region = _read(masks / f"{name}.png")[:, :, 0] > 0.5
        assert scores.name == name and (scores.height, scores.width) == (40, 56)
        assert scores.baseline["psnr"] == pytest.approx(psnr(image, target), abs=1e-6)
        assert scores.baseline["ssim"] == pytest.approx(ssim(image, target), abs=1e-6)
        assert scores.baseline["si"] == pytest.approx(si(image, target), abs=1e-6)
        assert scores.model["psnr"] == pytest.approx(psnr(output, target), abs=1e-4)
        assert scores.model["ssim"] == pytest.approx(ssim(output, target), abs=1e-5)
        if name == "c":
            assert scores.model["ssimr"] is None and scores.baseline["sir"] is None
        else:
            assert scores.baseline["ssimr"] == pytest.approx(ssim_region(image, target, region), abs=1e-6)
            assert scores.model["sir"] == pytest.approx(si_region(output, target, region), abs=1e-5)
    assert report.mean("model")["psnr"] == pytest.approx(np.mean([s.model["psnr"] for s in report.images]))
    assert report.mean("baseline")["ssimr"] == pytest.approx(
        np.mean([s.baseline["ssimr"] for s in report.images[:2]]))

    out = tmp_path / "out"
    data = json.loads((out / "report.json").read_text())
    assert data["protocol"]["resize"] == "native" and len(data["images"]) == 3
    assert data["images"][2]["model"]["ssimr"] is None
    assert data["mean"]["baseline"]["psnr"] == pytest.approx(report.mean("baseline")["psnr"])
    # What a reader needs to repeat it: the runtime and precision, the weights' checksums, the machine,
    # the data's whole path, and how many images the region metrics average.
    from dereflect.manifest import load_manifest

    manifest = load_manifest(crrn_dir)
    assert data["model"]["runtime"].startswith("onnxruntime") and "fp32" in data["model"]["runtime"]
    assert data["model"]["networks"] == {name: {"onnx": spec.onnx, "sha256": spec.sha256}
                                         for name, spec in manifest.networks.items()}
    assert data["machine"]["python"] and data["machine"]["opencv"] == cv2.__version__
    assert data["data"]["dir"] == str(paired.resolve()) and data["region_images"] == 2
    markdown = (out / "report.md").read_text()
    assert "- Region metrics (SSIMr, SIr): over 2 of 3 images (the others' region is empty)" in markdown
    assert BASELINE_LABEL in markdown and "toy-crrn" in markdown and "Resize protocol: native" in markdown
    assert "| | PSNR | SSIM | SI | SSIMr | SIr | s/image |" in markdown
    assert f"| a | 40x56 | {report.images[0].baseline['psnr']:.2f} | {report.images[0].model['psnr']:.2f} |" \
        in markdown
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    # CRRN has no stage 1 or confidence map: input | result | ground truth, no columns of "n/a"
    assert sheet.shape == (22 + 3 * (18 + CONTACT_TILE + 4), 4 + 3 * (CONTACT_TILE + 4), 3)
    assert report.contact_columns == ("input", "result", "ground truth")
    assert "- Contact sheet: contact_sheet.png (input | result | ground truth)" in markdown


def test_reflection_mask_marks_where_the_input_is_brighter_despite_misalignment():
    target = 0.75 * _photo(80, 96, seed=3)  # room for the added light: no clipping
    image = target.copy()
    image[20:60, 30:80] = np.clip(image[20:60, 30:80] + 0.2, 0, 1)  # the reflection: light added
    image = np.roll(image, 1, axis=1)  # real pairs are a pixel or so apart
    mask = reflection_mask(image, target)
    truth = np.zeros(mask.shape, bool)
    truth[20:60, 31:81] = True
    # The blur widens the region by about 0.7 sigma each side: the reflection is covered, little more.
    assert (mask & truth).sum() / truth.sum() > 0.97 and (mask & truth).sum() / (mask | truth).sum() > 0.8
    assert not mask[:12].any() and not mask[:, :20].any()
    # Darker everywhere (a gain below 1) is not a reflection; brighter everywhere marks the frame.
    assert not reflection_mask(0.9 * target, target).any()
    assert reflection_mask(np.clip(target + 0.1, 0, 1), target).mean() > 0.95


def test_evaluate_auto_masks_are_the_pairs_reflection_masks(crrn_dir, paired, tmp_path):
    masks = tmp_path / "masks"
    for name in ("a", "b", "c"):
        blended, clean = _read(paired / f"blended/{name}.png"), _read(paired / f"transmission_layer/{name}.png")
        region = reflection_mask(blended, clean)
        assert 0.05 < region.mean() < 1.0
        _write(masks / f"{name}.png", region.astype(np.float32), grey=True)
    auto = evaluate(crrn_dir, paired, masks="auto", out_dir=tmp_path / "out", progress=False)
    drawn = evaluate(crrn_dir, paired, masks=masks, progress=False)
    assert auto.metrics == ("psnr", "ssim", "si", "ssimr", "sir")
    for mine, theirs in zip(auto.images, drawn.images):
        for row in ("model", "baseline"):
            assert getattr(mine, row) == pytest.approx(getattr(theirs, row), abs=1e-9)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data"]["masks"] == "auto"
    assert "region masks derived from each pair" in (tmp_path / "out" / "report.md").read_text()


def test_evaluate_resize_limit_and_identity_baseline(crrn_dir, tmp_path):
    root = tmp_path / "same"
    for name in ("p", "q"):
        _write(root / f"input/{name}.png", _photo(48, 64, seed=5))
        _write(root / f"target/{name}.png", _photo(48, 64, seed=5))
    report = evaluate(crrn_dir, root, resize="short:24", limit=1, contact_images=0, progress=False)
    assert len(report.images) == 1 and (report.images[0].height, report.images[0].width) == (24, 32)
    assert report.protocol["resize"] == "short:24"
    assert "short side is 24 px" in report.protocol["resize_description"]
    assert report.images[0].baseline["psnr"] == float("inf")  # the input is the ground truth
    assert report.to_dict()["images"][0]["baseline"]["psnr"] is None  # JSON has no infinity
    assert report.contact_sheet is None
    json.loads(report.to_json())
    with pytest.raises(InputError, match="limit"):
        evaluate(crrn_dir, root, limit=0, progress=False)


def test_evaluate_rm2s_intermediates_in_contact_sheet(rm2s_dir, paired):
    remover = Remover.load(rm2s_dir)
    report = evaluate(remover, paired, contact_images=2, progress=False)
    image, target = _read(paired / "blended/c.png"), _read(paired / "transmission_layer/c.png")
    assert report.images[2].model["psnr"] == pytest.approx(psnr(remover.remove(image, colour_order="RGB"), target),
                                                           abs=1e-6)
    sheet = report.contact_sheet
    assert sheet.shape == (22 + 2 * (18 + CONTACT_TILE + 4), 4 + 5 * (CONTACT_TILE + 4), 3)
    top = 22 + 18
    lefts = [4 + c * (CONTACT_TILE + 4) for c in range(len(CONTACT_COLUMNS))]
    tiles = [sheet[top:top + CONTACT_TILE, left:left + CONTACT_TILE] for left in lefts]
    # The confidence column is a colour map (not grey, not the "n/a" placeholder).
    confidence = tiles[2].astype(int)
    assert np.abs(confidence[..., 0] - confidence[..., 2]).max() > 50
    # The first row is image "a"; its ground-truth tile is the (enlarged) ground truth.
    first = (_read(paired / "transmission_layer/a.png") * 255 + 0.5).astype(np.uint8)
    expected = cv2.resize(first, (CONTACT_TILE, int(round(40 * CONTACT_TILE / 56))),
                          interpolation=cv2.INTER_NEAREST)
    offset = (CONTACT_TILE - expected.shape[0]) // 2
    np.testing.assert_array_equal(tiles[4][offset:offset + expected.shape[0]], expected)


def test_contact_sheet_layout_and_placeholders():
    tile = np.full((32, 32, 3), 200, np.uint8)
    sheet = contact_sheet([("one", [tile, tile, tile, tile, tile]), ("two", [tile] * 5)], tile=32)
    assert sheet.shape == (22 + 2 * (18 + 32 + 4), 4 + 5 * 36, 3)
    np.testing.assert_array_equal(sheet[22 + 18:22 + 18 + 32, 4:36], tile)


def test_model_arguments(crrn_dir, tmp_path):
    with pytest.raises(ModelError, match="checkpoint=PATH"):
        load_model(crrn_dir, backend="torch")
    with pytest.raises(ModelError, match="model not found"):
        load_model(tmp_path / "nothing")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ModelError, match="not a model"):
        load_model(other)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"x")
    with pytest.raises(ModelError, match="safetensors"):
        load_model(fake, backend="onnxruntime")
    assert load_model(crrn_dir / "manifest.json").method.name == "crrn"


def test_eval_draws_its_progress_bar_on_a_terminal_only(monkeypatch, crrn_dir, paired, tmp_path):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    evaluate(crrn_dir, paired, out_dir=tmp_path / "log", contact_images=0)
    assert "\r" not in log.getvalue() and "dereflect eval" not in log.getvalue()
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate(crrn_dir, paired, out_dir=tmp_path / "tty", contact_images=0)
    assert "dereflect eval" in terminal.getvalue() and "image" in terminal.getvalue()


def test_cli_eval(monkeypatch, crrn_dir, paired, tmp_path, capsys):
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    out = tmp_path / "cli_out"
    code = dereflect.cli.main(["eval", str(crrn_dir), "--data", str(paired), "--resize", "short:32",
                               "--out", str(out), "--no-progress", "--layout", "real20"])
    assert code == 0
    printed = capsys.readouterr().out
    assert BASELINE_LABEL in printed and "gain over do nothing" in printed and "resize short:32" in printed
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "contact_sheet.png"}
    assert json.loads((out / "report.json").read_text())["data"]["layout"] == "real20"

    code = dereflect.cli.main(["eval", str(crrn_dir), "--data", str(tmp_path / "nowhere"), "--no-progress"])
    assert code == 2 and "data folder not found" in capsys.readouterr().err


def test_eval_scores_the_model_at_the_strength_asked_and_says_so(monkeypatch, crrn_dir, paired, tmp_path, capsys):
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    report = evaluate(crrn_dir, paired, progress=False, strength=0)
    for scores in report.images:  # strength 0 leaves the input: the model scores as doing nothing
        assert scores.model["psnr"] == pytest.approx(scores.baseline["psnr"], abs=1e-6)
    assert report.model["strength"] == 0 and report.model_label == "toy-crrn at strength 0"
    half = evaluate(crrn_dir, paired, progress=False, strength=0.5)
    for scores, name in zip(half.images, "abc"):
        image = _read(paired / f"blended/{name}.png")
        target = _read(paired / f"transmission_layer/{name}.png")
        assert scores.model["psnr"] == pytest.approx(psnr(0.85 * image, target), abs=1e-3)
    out = tmp_path / "out"
    assert dereflect.cli.main(["eval", str(crrn_dir), "--data", str(paired), "--strength", "0.5", "--out", str(out),
                               "--no-progress"]) == 0
    assert "toy-crrn at strength 0.5" in capsys.readouterr().out
    assert "Model: toy-crrn at strength 0.5" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["model"]["strength"] == 0.5


def test_a_stop_signal_ends_eval_between_images_with_a_partial_report(monkeypatch, crrn_dir, paired, tmp_path,
                                                                       capsys):
    import dereflect.tools.evaluate as evaluate_module

    class Signals:  # what StopSignals gives: the first signal's name once one has come
        received = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    signals = Signals()
    real_load = evaluate_module.load_model

    def load_then_signal_after_the_second_image(model, **options):
        runner = real_load(model, **options)
        remove = runner.remove_with_intermediates
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                signals.received = "SIGINT"  # Ctrl+C while the second image runs
            return remove(*args, **kwargs)

        runner.remove_with_intermediates = counted
        return runner

    monkeypatch.setattr(evaluate_module, "load_model", load_then_signal_after_the_second_image)
    monkeypatch.setattr(evaluate_module, "StopSignals", lambda: signals)
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    out = tmp_path / "out"
    code = dereflect.cli.main(["eval", str(crrn_dir), "--data", str(paired), "--out", str(out), "--no-progress"])
    assert code == 130
    assert "stopped by SIGINT after 2 of 3 images" in capsys.readouterr().err
    data = json.loads((out / "report.json").read_text())
    assert [i["name"] for i in data["images"]] == ["a", "b"] and data["data"]["images"] == 2
    assert data["protocol"]["stopped"].startswith("by SIGINT after 2 of 3 images")
    full = evaluate(crrn_dir, paired, progress=False)
    assert data["mean"]["model"]["psnr"] == pytest.approx(np.mean([s.model["psnr"] for s in full.images[:2]]))
    assert "**Partial**: stopped by SIGINT after 2 of 3 images" in (out / "report.md").read_text()


def test_import_needs_no_torch():
    code = "import sys, dereflect.tools.evaluate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_checkpoints_run_on_torch(tmp_path, paired):
    pytest.importorskip("torch")
    from dereflect.train.checkpoint import save_checkpoint

    networks = tiny_rm2s_networks()
    both = save_checkpoint(tmp_path / "stage2.safetensors", method="rm2s", kind="rm2s-stage2",
                           networks=networks)
    only1 = save_checkpoint(tmp_path / "stage1.safetensors", method="rm2s", kind="rm2s-stage1",
                            networks={"stage1": networks["stage1"]})

    full = evaluate(both, paired, limit=1, contact_images=0, device="cpu", progress=False)
    assert full.model["backend"] == "torch" and full.model["method"] == "rm2s"
    stage1 = load_model(only1, device="cpu")
    assert stage1.method.name == "rm2s-stage1"
    image = _read(paired / "blended/a.png")
    # Stage 1 alone returns what the full model computes as its stage-1 intermediate.
    expected = load_model(both, device="cpu").remove_with_intermediates(image).stage1
    np.testing.assert_allclose(stage1.remove_with_intermediates(image).background, expected, atol=1e-5)
    alone = evaluate(stage1, paired, limit=1, contact_images=0, progress=False)
    target = _read(paired / "transmission_layer/a.png")
    assert alone.images[0].model["psnr"] == pytest.approx(psnr(expected, target), abs=1e-3)
    assert full.images[0].model["psnr"] != pytest.approx(alone.images[0].model["psnr"], abs=1e-6)
    with pytest.raises(InputError, match="runs on the torch backend"):
        load_model(both, backend="onnxruntime")


def test_global_gain_baseline_is_fitted_on_training_pairs_and_scored_beside_the_model(crrn_dir, tmp_path, capsys):
    """fit-gain finds the channel gains of pairs whose clean layer is the photo times (0.9, 0.8, 0.7);
    eval scores that baseline (exact here: PSNR far above do nothing) and the model's difference to it."""
    rng = np.random.default_rng(4)
    root = tmp_path / "pairs"
    for folder in ("blended", "transmission_layer"):
        (root / folder).mkdir(parents=True)
    for name in ("1", "2", "3"):
        photo = rng.uniform(0.2, 0.9, (24, 32, 3)).astype(np.float32)
        clean = photo * np.float32([0.9, 0.8, 0.7])
        cv2.imwrite(str(root / "blended" / f"{name}.png"), np.round(photo[:, :, ::-1] * 65535).astype(np.uint16))
        cv2.imwrite(str(root / "transmission_layer" / f"{name}.png"),
                    np.round(clean[:, :, ::-1] * 65535).astype(np.uint16))
    holdout = tmp_path / "val.txt"
    holdout.write_text("3\n")
    gain_file = tmp_path / "gain.json"
    assert dereflect.cli.main(["train", "fit-gain", "--real", str(root), "--real-holdout", str(holdout),
                               "-o", str(gain_file)]) == 0
    fitted = json.loads(gain_file.read_text())
    assert fitted["pairs"] == ["1", "2"] and np.allclose(fitted["gain"], [0.9, 0.8, 0.7], atol=1e-3)
    report = evaluate(crrn_dir, root, gain_baseline=gain_file, contact_images=0, progress=False)
    gain, nothing = report.mean("gain"), report.mean("baseline")
    assert gain["psnr"] > 60 > nothing["psnr"]
    table = report.mean_table()
    assert "global gain (0.900, 0.800, 0.700)" in table and "gain over global gain" in table
    assert report.to_dict()["mean"]["gain_baseline"]["psnr"] == pytest.approx(gain["psnr"])
    assert evaluate(crrn_dir, root, gain_baseline="1,1,1", contact_images=0, progress=False
                    ).mean("gain")["psnr"] == pytest.approx(nothing["psnr"], abs=0.05)
    with pytest.raises(InputError, match="three positive gains"):
        evaluate(crrn_dir, root, gain_baseline="1,-1,1", progress=False)
    assert dereflect.cli.main(["train", "fit-gain", "--real", str(root), "-o", str(gain_file)]) == 2
    assert "exists" in capsys.readouterr().err


def test_best_channel_gains_are_the_least_squares_factors_held_to_their_range():
    rng = np.random.default_rng(5)
    image = rng.uniform(0.1, 0.9, (20, 30, 3)).astype(np.float32)
    assert np.allclose(best_channel_gains(image, image * np.float32([0.9, 1.1, 0.7])), [0.9, 1.1, 0.7], atol=1e-5)
    assert np.allclose(best_channel_gains(image, image * np.float32([0.1, 3.0, 1.0])), [0.5, 2.0, 1.0])
    noisy = image * np.float32([0.8, 0.9, 1.0]) + rng.normal(0, 0.05, image.shape).astype(np.float32)
    gains = best_channel_gains(image, noisy)
    for channel in range(3):  # the minimum of the squared error: nudging a gain either way costs more
        for step in (-0.01, 0.01):
            nudged = gains.copy()
            nudged[channel] += step
            assert np.sum((image * nudged - noisy) ** 2) > np.sum((image * gains - noisy) ** 2)
    with pytest.raises(InputError, match="HxWx3"):
        best_channel_gains(image[..., 0], image[..., 0])


def test_colour_fitted_scores_separate_global_colour_from_the_rest(crrn_dir, tmp_path, capsys):
    """A pair whose clean layer is its photo in other colours: doing nothing scores low, but perfectly
    once colour fitted; the model's rows are reported beside, in the table, JSON and on the command line."""
    rng = np.random.default_rng(6)
    root = tmp_path / "pairs"
    for folder in ("blended", "transmission_layer"):
        (root / folder).mkdir(parents=True)
    for name in ("1", "2"):
        photo = rng.uniform(0.2, 0.9, (24, 32, 3)).astype(np.float32)
        cv2.imwrite(str(root / "blended" / f"{name}.png"), np.round(photo[:, :, ::-1] * 65535).astype(np.uint16))
        cv2.imwrite(str(root / "transmission_layer" / f"{name}.png"),
                    np.round((photo * np.float32([0.9, 0.8, 0.7]))[:, :, ::-1] * 65535).astype(np.uint16))
    report = evaluate(crrn_dir, root, colour_fitted=True, contact_images=0, progress=False)
    assert report.mean("baseline_fitted")["psnr"] > 60 > report.mean("baseline")["psnr"]
    model, fitted = report.mean("model"), report.mean("model_fitted")
    assert fitted["psnr"] >= model["psnr"] - 0.01 and fitted["psnr"] != model["psnr"]
    assert f"| {report.model['name']}, colour fitted |" in report.mean_table()
    data = report.to_dict()
    assert data["mean"]["model_fitted"]["psnr"] == pytest.approx(fitted["psnr"])
    assert data["images"][0]["baseline_fitted"]["psnr"] > 60
    plain = evaluate(crrn_dir, root, contact_images=0, progress=False)
    assert "colour fitted" not in plain.mean_table() and "model_fitted" not in plain.to_dict()["mean"]
    assert dereflect.cli.main(["eval", str(crrn_dir), "--data", str(root), "--colour-fitted", "--no-progress"]) == 0
    assert "gain over do nothing, colour fitted" in capsys.readouterr().out


def test_photos_without_ground_truth_get_a_contact_sheet_and_the_mean_change(crrn_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("p1", "p2"):
        cv2.imwrite(str(folder / f"{name}.png"), (_photo(seed=len(name))[:, :, ::-1] * 255).astype(np.uint8))
    with pytest.raises(InputError, match="--layout photos"):
        evaluate(crrn_dir, folder, progress=False)
    report = evaluate(crrn_dir, folder, layout="photos", out_dir=tmp_path / "out", progress=False)
    assert [s.name for s in report.images] == ["p1", "p2"]
    assert report.mean("model")["psnr"] is None and report.images[0].change > 0
    change = 255 * np.mean([s.change for s in report.images])
    assert f"| toy-crrn | 2 | {change:.2f} / 255 | {report.seconds_per_image:.3f} |" in report.mean_table()
    sheet = cv2.imread(str(tmp_path / "out" / "contact_sheet.png"))
    assert sheet.shape[0] == 22 + 2 * (18 + CONTACT_TILE + 4)


def test_photos_print_and_report_only_what_means_something_without_ground_truth(monkeypatch, crrn_dir, tmp_path,
                                                                               capsys):
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    folder = tmp_path / "photos"
    for name in ("p1", "p2"):
        _write(folder / f"{name}.png", _photo(seed=len(name) + 3))
    out = tmp_path / "look"
    assert dereflect.cli.main(["eval", str(crrn_dir), "--data", str(folder), "--layout", "photos", "--out", str(out),
                               "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    change = 255 * report["mean"]["model_mean_change"]
    # No table of "-" scores: the model, the images, the mean change, the time per image, the contact sheet.
    assert re.fullmatch(
        re.escape(f"toy-crrn on {folder} (photos, 2 images, resize native)\n"
                  "| | images | mean change | s/image |\n|---|---|---|---|\n"
                  f"| toy-crrn | 2 | {change:.2f} / 255 | ") + r"\d+\.\d{3}" + re.escape(" |\n\n"
                  "No ground truth: nothing scored. Mean change: |output - input| per pixel and channel.\n"
                  f"contact sheet: {out / 'contact_sheet.png'}\nreport written to {out / 'report.md'}\n"),
        printed), printed
    markdown = (out / "report.md").read_text()
    assert "PSNR" not in markdown and " - |" not in markdown and "| - " not in markdown
    assert "- Contact sheet: contact_sheet.png (input | result | 4x |change|)" in markdown
    for image in report["images"]:
        assert f"| {image['name']} | 40x56 | {255 * image['mean_change']:.2f} / 255 | " in markdown
    assert dereflect.cli.main(["eval", str(crrn_dir), "--data", str(folder), "--layout", "photos",
                               "--no-progress"]) == 0
    assert "contact sheet: not written (--out DIR writes it)" in capsys.readouterr().out


def _no_model(*args, **kwargs):
    pytest.fail("the model was loaded before the options were checked")


def test_eval_checks_out_and_contact_images_before_any_work(monkeypatch, crrn_dir, paired, tmp_path, capsys):
    import dereflect.tools.evaluate as evaluate_module

    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    monkeypatch.setattr(evaluate_module, "load_model", _no_model)
    keep = tmp_path / "keep.jpg"
    keep.write_bytes(b"a photo")
    for extra, message in ((["--out", str(keep), "--limit", "2"], f"{keep}: exists and is not a folder"),
                           (["--contact-images", "-1"], "--contact-images must be 0 (no contact sheet) or a "
                                                        "positive number of rows, not -1"),
                           (["--contact-images", "-1", "--flicker"], "--contact-images must be 0")):
        code = dereflect.cli.main(["eval", str(crrn_dir), "--data", str(paired), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"dereflect: error: {message}") and err.count("\n") == 1
    assert keep.read_bytes() == b"a photo"
    with pytest.raises(InputError, match="--contact-images must be 0"):
        evaluate(crrn_dir, paired, contact_images=-2, progress=False)


def test_eval_replaces_an_earlier_report_only_with_overwrite(monkeypatch, crrn_dir, paired, tmp_path, capsys):
    import dereflect.tools.evaluate as evaluate_module

    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    out = tmp_path / "out"
    command = ["eval", str(crrn_dir), "--data", str(paired), "--out", str(out), "--no-progress"]
    assert dereflect.cli.main(command) == 0
    capsys.readouterr()
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(earlier) == ["contact_sheet.png", "report.json", "report.md"]

    real_load = evaluate_module.load_model
    monkeypatch.setattr(evaluate_module, "load_model", _no_model)
    assert dereflect.cli.main(command + ["--limit", "1"]) == 2
    assert capsys.readouterr().err == (f"dereflect: error: {out}: report.md, report.json, contact_sheet.png exist "
                                       "already (an earlier report); pass --overwrite to replace them\n")
    (out / "report.json").unlink()
    (out / "contact_sheet.png").unlink()
    assert dereflect.cli.main(command) == 2
    assert capsys.readouterr().err == (f"dereflect: error: {out / 'report.md'}: file exists; pass --overwrite to "
                                       "replace it\n")
    assert (out / "report.md").read_bytes() == earlier["report.md"]
    with pytest.raises(InputError, match="file exists"):
        evaluate(crrn_dir, paired, out_dir=out, progress=False)

    # With --overwrite the new report replaces the old, and an old sheet does not stay beside a report without one.
    monkeypatch.setattr(evaluate_module, "load_model", real_load)
    (out / "contact_sheet.png").write_bytes(earlier["contact_sheet.png"])
    assert dereflect.cli.main(command + ["--overwrite", "--limit", "1", "--contact-images", "0"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["data"]["images"] == 1


def test_outputs_made_elsewhere_are_scored_as_a_models(paired, tmp_path, monkeypatch, capsys):
    """--predictions: another method's results, one file per pair, scored by the same metrics and protocol."""
    outputs = tmp_path / "theirs"
    for name in ("a", "b", "c"):
        _write(outputs / f"{name}.png", 0.9 * _read(paired / f"transmission_layer/{name}.png"))
    report = evaluate(outputs, paired, predictions=True, resize="short:20", progress=False)
    for scores, name in zip(report.images, ("a", "b", "c")):
        truth = resize_short(_read(paired / f"transmission_layer/{name}.png"), 20)
        theirs = resize_short(_read(outputs / f"{name}.png"), 20)
        assert scores.model["psnr"] == pytest.approx(psnr(theirs, truth), abs=1e-6)
    assert report.model["name"] == "theirs" and report.model["backend"] == "precomputed outputs"
    (outputs / "c.png").unlink()
    with pytest.raises(InputError, match="no output for pair 'c'"):
        evaluate(outputs, paired, predictions=True, progress=False)
    _write(outputs / "c.png", np.zeros((12, 12, 3), np.float32))
    with pytest.raises(InputError, match="outputs must have their input's size"):
        evaluate(outputs, paired, predictions=True, progress=False)
    with pytest.raises(InputError, match="model options .*strength.* do not apply"):
        evaluate(outputs, paired, predictions=True, strength=0.5, progress=False)
    # The command: MODEL is the folder; a model option or --flicker is refused in one line.
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    _write(outputs / "c.png", 0.9 * _read(paired / "transmission_layer/c.png"))
    assert dereflect.cli.main(["eval", str(outputs), "--predictions", "--data", str(paired), "--no-progress"]) == 0
    assert "theirs on" in capsys.readouterr().out
    assert dereflect.cli.main(["eval", str(outputs), "--predictions", "--data", str(paired), "--strength", "2"]) == 2
    assert dereflect.cli.main(["eval", str(outputs), "--predictions", "--flicker"]) == 2


def test_sir2_means_are_reported_per_subset_as_published_tables_give_them(crrn_dir, paired, tmp_path):
    root = tmp_path / "SIR2"
    _pair(root, "Solid/blended/s1.png", "Solid/transmission_layer/s1.png", seed=0)
    _pair(root, "Solid/blended/s2.png", "Solid/transmission_layer/s2.png", seed=1)
    _pair(root, "Wild/withgt/7/m.png", "Wild/withgt/7/g.png", seed=2)
    report = evaluate(crrn_dir, root, out_dir=tmp_path / "out", progress=False)
    assert report.subsets == {"Solid": 2, "Wild": 1}
    solid = [s.model["psnr"] for s in report.images if s.name.startswith("Solid/")]
    assert report.mean("model", "Solid")["psnr"] == pytest.approx(np.mean(solid))
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["subsets"]["Wild"]["images"] == 1
    assert data["subsets"]["Solid"]["model"]["psnr"] == pytest.approx(np.mean(solid))
    assert "## Mean per subset (input -> model)" in (tmp_path / "out" / "report.md").read_text()
    # Pairs side by side in one folder: no subsets, no such table.
    assert evaluate(crrn_dir, paired, progress=False).subsets == {}
