"""Training and evaluating on one's own data: what a user's folders were taken for, how name lists and pairs
of two sizes are reported, unreadable photos in eval, the names checkpoints of runs go by, and the contact
sheet's columns and labels.

Each test stands for a report from a user training on their own data; see the comment above it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import smooth_photo, write_photo_folder, write_real_pairs
from dereflect.cli import EXIT_SOME_FAILED, EXIT_USAGE, main
from dereflect.errors import InputError
from dereflect.tools.datasets import filter_pairs, find_pairs, read_paired
from dereflect.tools.evaluate import CONTACT_COLUMNS, contact_sheet, evaluate
from onnx_fixtures import make_crrn_export

torch = pytest.importorskip("torch")

from dereflect.train.data import GroundTruthPairs, RealPairs, SyntheticPairs, find_images, read_real_pairs  # noqa: E402
from dereflect.train.synthesis import SynthesisConfig  # noqa: E402


def _ceilnet(root: Path, names) -> Path:
    """CEILNet triplets NAME-input / NAME-label1 / NAME-label2 in one folder."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        clean, layer = smooth_photo(rng, 96, 128), smooth_photo(rng, 96, 128) // 4
        cv2.imwrite(str(root / f"{name}-label1.png"), clean)
        cv2.imwrite(str(root / f"{name}-label2.png"), layer)
        cv2.imwrite(str(root / f"{name}-input.png"), np.clip(clean.astype(int) + layer, 0, 255).astype(np.uint8))
    return root


def _sir2(root: Path) -> Path:
    """SIR2 as most code repackages it (subset/blended + subset/transmission_layer) and as captured (m/g)."""
    write_real_pairs(root / "SolidObjectDataset", ["s1", "s2"])
    rng = np.random.default_rng(2)
    for scene in ("7", "8"):
        photo = smooth_photo(rng, 96, 128)
        (root / "WildSceneDataset" / scene).mkdir(parents=True)
        cv2.imwrite(str(root / "WildSceneDataset" / scene / "m.jpg"), photo)
        cv2.imwrite(str(root / "WildSceneDataset" / scene / "g.jpg"), np.round(photo * 0.8).astype(np.uint8))
    return root


def _resize_target(root: Path, name: str, size=(64, 80)) -> None:
    """Make pair ``name``'s ground truth another size than its input."""
    path = root / "transmission_layer" / f"{name}.png"
    cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), size[::-1]))


# -- 1. a folder of pairs given as --data ----------------------------------------------------------
# `train crrn --data DIR` on a paired folder or CEILNet triplets trained without a word, on photos with
# reflections taken for clean backgrounds ("12 photos in real/" in the metadata).

@pytest.mark.parametrize("make, words", [
    (lambda root: write_real_pairs(root, ["a", "b", "c"]), "a paired data set"),
    (lambda root: _ceilnet(root, ["a", "b"]), "CEILNet triplets"),
    (_sir2, "pairs in the SIR2 layout"),
])
def test_a_data_set_with_ground_truth_is_refused_as_photos_to_synthesise_from(tmp_path, make, words):
    pairs = make(tmp_path / "mine")
    for read in (lambda: find_images(pairs), lambda: SyntheticPairs(pairs, SynthesisConfig.crrn(size=64))):
        with pytest.raises(InputError) as refused:
            read()
        message = str(refused.value)
        assert "\n" not in message and f"{pairs} holds" in message and words in message
        assert "--real DIR" in message and "--val DIR" in message
    if make is _sir2:  # pairs in sub-folders: which ones
        assert "(in SolidObjectDataset/, WildSceneDataset/)" in message
    # One such folder among the photo folders is refused too.
    photos = write_photo_folder(tmp_path / "photos", 3)
    with pytest.raises(InputError, match="pairs with ground truth"):
        find_images([photos, pairs])


def test_the_training_commands_refuse_a_paired_folder_as_data_in_one_line(tmp_path, capsys):
    pairs = write_real_pairs(tmp_path / "real", [str(i) for i in range(12)])
    assert main(["train", "synthesize", "--data", str(pairs), "--count", "2", "--size", "64",
                 "-o", str(tmp_path / "out")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 12 pairs with ground truth" in err and "--real DIR" in err
    assert not (tmp_path / "out").exists()


def test_photos_named_like_one_half_of_a_layout_are_still_photos(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", 3)
    # A stray NAME-input file or PREFIX_m file (names two layouts use), without their other halves.
    cv2.imwrite(str(photos / "window-input.jpg"), smooth_photo(np.random.default_rng(5), 96, 128))
    cv2.imwrite(str(photos / "holiday_m.jpg"), smooth_photo(np.random.default_rng(6), 96, 128))
    assert len(find_images(photos)) == 5
    # A clean-layer folder on its own is clean photos.
    pairs = write_real_pairs(tmp_path / "real", ["a", "b"])
    assert len(find_images(pairs / "transmission_layer")) == 2


# -- 2. --real in the SIR2 layout ----------------------------------------------------------------
# `--real` with a SIR2 folder said "no paired folders" although --val and eval read SIR2.

def test_real_pairs_read_every_layout_eval_reads(tmp_path):
    sir2 = _sir2(tmp_path / "SIR2")
    real = RealPairs(sir2, size=64, seed=1, colour_jitter=0.0)
    assert real.layout == "sir2"
    assert real.names == ["SolidObjectDataset/s1", "SolidObjectDataset/s2", "WildSceneDataset/7",
                          "WildSceneDataset/8"]
    assert real.names == [pair.name for pair in find_pairs(sir2)[1]]  # as eval finds them
    inp, clean = real.sample_arrays((3, 0, 0))
    assert inp.shape == clean.shape == (64, 64, 3)
    assert np.abs(clean - 0.8 * inp).max() < 0.05  # the same crop of both images (JPEG-coded)
    assert real.describe_sources() == {"real pairs": "4 pairs in SIR2/ (sir2 layout)"}
    held = RealPairs(sir2, size=64, exclude_names=["WildSceneDataset/8"])
    assert held.names[-1] == "WildSceneDataset/7"
    ceilnet = RealPairs(_ceilnet(tmp_path / "ceil", ["x", "y"]), size=64)
    assert ceilnet.layout == "ceilnet" and ceilnet.names == ["x", "y"]
    # The paired layout keeps the words earlier runs recorded.
    paired = RealPairs(write_real_pairs(tmp_path / "zhang", ["1"]), size=64)
    assert paired.describe_sources() == {"real pairs": "1 pairs in zhang/"}


def test_real_pairs_without_a_layout_say_where_photos_go(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", 2)
    with pytest.raises(InputError, match="no known dataset layout.*Photos without ground truth go to --data") \
            as refused:
        RealPairs(photos, size=64)
    assert "--layout photos" not in str(refused.value)  # eval's option, not train's


def test_the_paired_reader_names_the_sir2_layout_it_finds(tmp_path):
    sir2 = _sir2(tmp_path / "SIR2")
    with pytest.raises(InputError, match=r"no paired folders .*it holds pairs in the SIR2 layout .*, which layout "
                                         r"sir2 \(or auto\) reads, as eval, train --val and train --real do"):
        read_paired(sir2)
    # fit-gain reads --real as training does: SIR2 too
    assert main(["train", "fit-gain", "--real", str(sir2), "-o", str(tmp_path / "gain.json")]) == 0


# -- 3. name lists and pairs of two sizes --------------------------------------------------------
# A holdout line `10.jpg` was refused without saying names are stems; pairs of two sizes came one per run.

def test_a_name_with_an_image_extension_stands_for_its_stem(tmp_path):
    root = write_real_pairs(tmp_path / "real", ["1", "2", "10"])
    pairs = read_paired(root)
    assert [p.name for p in filter_pairs(pairs, ["10.jpg", "2.PNG"], keep=False, where="x")] == ["1"]
    assert [p.name for p in filter_pairs(pairs, ["10"], keep=True, where="x")] == ["10"]
    real = RealPairs(root, size=64, exclude_names=["10.jpg"])
    assert real.names == ["1", "2"]
    with pytest.raises(InputError, match=r"2 name\(s\) that are not pairs there: \['11.jpg', 'notes.txt'\]; "
                                         r"names are file stems, the file name without its extension"):
        filter_pairs(pairs, ["11.jpg", "notes.txt", "1"], keep=False, where="x")


def test_every_pair_of_two_sizes_is_named_in_one_error(tmp_path, capsys):
    root = write_real_pairs(tmp_path / "real", ["a", "b", "c", "d"])
    _resize_target(root, "a")
    _resize_target(root, "c", (96, 100))
    wanted = (r"2 of 4 pair\(s\) have an input and a ground truth of different sizes \(a: input 96x128, ground "
              r"truth 64x80; c: input 96x128, ground truth 96x100\); a pair must have one size")
    for read in (lambda: RealPairs(root, size=64), lambda: GroundTruthPairs(root), lambda: read_real_pairs(root)):
        with pytest.raises(InputError, match=wanted):
            read()
    crrn = make_crrn_export(tmp_path / "crrn")
    with pytest.raises(InputError, match=wanted):
        evaluate(crrn, root, progress=False)
    # Held out, they are no bar; nor are validation pairs beyond --val-count, which are never read.
    assert RealPairs(root, size=64, exclude_names=["a", "c"]).names == ["b", "d"]
    _resize_target(root, "a", (96, 128))  # back to the input's size: only c differs now
    assert [pair.name for pair in GroundTruthPairs(root, count=2).pairs] == ["a", "b"]
    with pytest.raises(InputError, match="1 of 3 pair"):
        GroundTruthPairs(root, count=3)


def test_an_exif_rotation_that_makes_a_pair_one_size_is_no_mismatch(tmp_path):
    from dereflect.tools.datasets import size_mismatches

    root = write_real_pairs(tmp_path / "real", ["a"])
    rotated = cv2.rotate(cv2.imread(str(root / "transmission_layer" / "a.png")), cv2.ROTATE_90_CLOCKWISE)
    # Headers differ (96x128 and 128x96): only a decode tells whether the two images differ.
    cv2.imwrite(str(root / "transmission_layer" / "a.png"), rotated)
    assert size_mismatches(read_paired(root)) == ["a: input 96x128, ground truth 128x96"]


# -- 4. eval --layout photos with an unreadable photo -------------------------------------------
# eval stopped at the first corrupt photo with exit 2 and nothing looked at; remove skips such a file.

def test_eval_on_photos_skips_an_unreadable_one_and_says_some_failed(tmp_path, capsys):
    crrn = make_crrn_export(tmp_path / "crrn")
    photos = write_photo_folder(tmp_path / "photos", 3, height=40, width=56)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = tmp_path / "look"
    assert main(["eval", str(crrn), "--data", str(photos), "--layout", "photos", "--out", str(out),
                 "--no-progress"]) == EXIT_SOME_FAILED
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"dereflect: warning: skipping {photos / 'broken.jpg'}")
    assert "1 of 4 image(s) could not be read and were skipped; 3 looked at" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert [image["name"] for image in report["images"]] == ["train_000", "train_001", "train_002"]
    assert len(report["skipped"]) == 1 and "broken.jpg" in report["skipped"][0]
    assert "**Skipped**: 1 unreadable image(s)" in (out / "report.md").read_text()
    assert (out / "contact_sheet.png").is_file()
    # Nothing readable: nothing done.
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("x.jpg", "y.png"):
        (bad / name).write_bytes(b"not an image")
    assert main(["eval", str(crrn), "--data", str(bad), "--layout", "photos", "--no-progress"]) == EXIT_USAGE
    assert "none of the 2 image(s) could be read" in capsys.readouterr().err
    # Pairs with ground truth still stop: a set scored without some of its pairs is not the set.
    pairs = write_real_pairs(tmp_path / "pairs", ["a", "b"])
    (pairs / "blended" / "b.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="b.png"):
        evaluate(crrn, pairs, progress=False)


# -- 5. the names of a run's checkpoints ---------------------------------------------------------
# `eval runs/ft-crrn/final.safetensors` reported the model as "final": two runs could not be told apart.

def test_a_runs_checkpoint_is_named_after_its_run(tmp_path, monkeypatch):
    from conftest import tiny_rm2s_networks
    from dereflect.export.engine import default_engine_dir
    from dereflect.models import checkpoint_name, open_source
    from dereflect.train.checkpoint import save_checkpoint

    networks = tiny_rm2s_networks()
    names = []
    for run in ("ft-a", "ft-b"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        path = save_checkpoint(tmp_path / "runs" / run / "final.safetensors", method="rm2s", kind="rm2s-stage2",
                               networks=networks)
        names.append(open_source(path).manifest.name)
    assert names == ["ft-a/final", "ft-b/final"]
    assert checkpoint_name(tmp_path / "runs" / "ft-a" / "step0000400.safetensors") == "ft-a/step0000400"
    assert checkpoint_name(tmp_path / "runs" / "ft-a" / "best.safetensors") == "ft-a/best"
    assert checkpoint_name(tmp_path / "mean.safetensors") == "mean"  # a name of its own: kept
    assert checkpoint_name(tmp_path / "final_v2.safetensors") == "final_v2"
    monkeypatch.chdir(tmp_path / "runs" / "ft-b")
    assert checkpoint_name("last.safetensors") == "ft-b/last"  # from inside the run folder too
    # Used as a folder name, it is one folder, not two.
    folder = default_engine_dir(names[0])
    assert folder.parent == tmp_path / "runs" / "ft-b" and folder.name == "ft-a-final-engines"
    report = evaluate(tmp_path / "runs" / "ft-a" / "final.safetensors", write_real_pairs(tmp_path / "p", ["a"]),
                      contact_images=0, progress=False, device="cpu")
    assert report.model["name"] == "ft-a/final"


# -- 6. the contact sheet's columns and labels ---------------------------------------------------
# A CRRN sheet had two columns of "n/a"; non-ASCII names were drawn as "???"; labels overlapped.

def test_labels_are_drawn_in_readable_ascii():
    from dereflect.tools.evaluate import ascii_label

    assert ascii_label("café Straße naïve – Øre") == "cafe Strasse naive - Ore"
    assert ascii_label("北京 1") == "?? 1"
    assert ascii_label("plain -> ascii") == "plain -> ascii"


@pytest.mark.parametrize("tile", range(24, 66, 2))
def test_each_label_stays_inside_its_column_at_small_tiles(tile):
    tiles = [np.zeros((tile, tile, 3), np.uint8)] * len(CONTACT_COLUMNS)
    sheet = contact_sheet([("row", tiles)], tile=tile, columns=CONTACT_COLUMNS)
    header = sheet[:22]
    for col in range(len(CONTACT_COLUMNS)):
        left = 4 + col * (tile + 4)
        gap = header[:, left + tile:left + tile + 4]  # between this column and the next
        assert (gap == 16).all(), f"the label of column {col} runs into the next"
        assert (header[:, left:left + tile] > 16).any(), f"column {col} has no label"


def test_a_non_ascii_caption_is_drawn_as_its_ascii_spelling():
    tile = 32
    tiles = [np.zeros((tile, tile, 3), np.uint8)] * len(CONTACT_COLUMNS)
    # A non-ASCII caption is drawn as its ASCII spelling, not as "?" marks.
    named = contact_sheet([("café", tiles)], tile=tile)
    spelt = contact_sheet([("cafe", tiles)], tile=tile)
    np.testing.assert_array_equal(named, spelt)


def test_a_crrn_sheet_leaves_out_the_columns_no_row_has(tmp_path):
    crrn = make_crrn_export(tmp_path / "crrn")
    pairs = write_real_pairs(tmp_path / "pairs", ["a", "b"], size=(40, 56))
    report = evaluate(crrn, pairs, contact_images=2, progress=False)
    assert report.contact_columns == ("input", "result", "ground truth")
    assert report.contact_sheet.shape[1] == 4 + 3 * (160 + 4)


def test_fit_gain_and_reflection_layers_read_real_pairs_as_training_does(tmp_path, capsys):
    """One reading of --real (read_real_pairs): the gain fit and the reflection layers take a CEILNet folder
    and a holdout line with its extension, as training does."""
    real = _ceilnet(tmp_path / "ceil", ["x", "y", "z"])
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("z.png\n")
    assert main(["train", "fit-gain", "--real", str(real), "--real-holdout", str(holdout),
                 "-o", str(tmp_path / "gain.json")]) == 0
    assert json.loads((tmp_path / "gain.json").read_text())["pairs"] == ["x", "y"]
    assert main(["train", "reflection-layers", "--real", str(real), "--real-holdout", str(holdout),
                 "-o", str(tmp_path / "layers")]) == 0
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["x.png", "y.png"]
