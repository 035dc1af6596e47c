"""Temporal smoothing for video (dereflect.temporal) and the flicker measurement (dereflect.tools.flicker)."""

from __future__ import annotations

import dataclasses
import re
import types

import cv2
import numpy as np
import pytest
from conftest import smooth_photo
from dereflect.errors import InputError
from dereflect.methods.base import Layers
from dereflect.models import open_model
from dereflect.temporal import CentreFilter, ChangeFilter, ColourFilter, VideoSession
from dereflect.tools.flicker import flicker, flicker_sequence, measure_flicker
from onnx_fixtures import make_crrn_export, make_rm2s_export


class GainModel:
    """A stand-in remover whose output is the frame times a gain that jitters from frame to frame."""

    settings = None

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def process(self, rgb, settings=None):
        gain = np.float32(0.8 + self.rng.normal(0.0, 0.03))
        return Layers(background=np.clip(rgb * gain, 0, 1), reflection=rgb * (1 - gain))

    def background_of(self, rgb, settings=None):  # what a VideoSession calls
        return self.process(rgb, settings).background


def test_centre_filter_averages_and_restarts_at_a_cut():
    smooth = CentreFilter(alpha=0.5, reset_ratio=1.5)
    assert smooth(1.0, 4.0) == (1.0, 4.0)
    assert smooth(1.2, 4.4) == pytest.approx((1.1, 4.2))
    assert smooth(3.0, 9.0) == (3.0, 9.0)  # more than 1.5x: a new scene, no smearing across it
    smooth.reset()
    assert smooth(2.0, 2.5) == (2.0, 2.5)
    with pytest.raises(InputError):
        CentreFilter(alpha=0.0)


def test_colour_filter_steadies_a_jittering_global_gain():
    frames = [np.full((8, 8, 3), 0.5, np.float32)] * 20
    jittery = GainModel(1)
    per_frame = [jittery.process(f).background for f in frames]
    session = VideoSession(GainModel(1), temporal=True)
    smoothed = [session.remove(f, colour_order="RGB") for f in frames]
    assert flicker(smoothed, frames) < 0.5 * flicker(per_frame, frames)
    # the level follows the model's own average, not the input's
    assert abs(float(np.mean(smoothed[-1])) - 0.4) < 0.02
    keep = ColourFilter()
    still = np.full((4, 4, 3), 0.4, np.float32)
    assert np.allclose(keep(np.full((4, 4, 3), 0.5, np.float32), still), still)


class NoisyModel:
    """A stand-in remover whose change reacts to the whole frame: a darkening that wanders from frame to
    frame, as a network's output does when noise or a moving reflection elsewhere changes its input."""

    settings = None
    strength = 1.0

    def __init__(self, seed: int = 0, wander: float = 0.006):
        self.rng = np.random.default_rng(seed)
        self.wander = wander  # about 1.5 levels of 255: a network's flicker
        self.offset = 0.1

    def process(self, rgb, settings=None):
        change = (self.offset + self.rng.normal(0.0, self.wander, rgb.shape[:2])[..., None]).astype(np.float32)
        return Layers(background=np.clip(rgb - self.strength * change, 0, 1), reflection=None)

    def background_of(self, rgb, settings=None):
        return self.process(rgb, settings).background


def test_change_filter_steadies_a_wandering_change_where_the_frame_stays_put():
    rng = np.random.default_rng(3)
    scene = rng.uniform(0.3, 0.9, (32, 48, 3)).astype(np.float32)
    frames = [scene.copy() for _ in range(30)]
    for t, frame in enumerate(frames):  # a bright square sliding 4 px a frame over the still scene
        frame[8:20, 4 * t % 36:4 * t % 36 + 12] = 1.0
    jittery, model = NoisyModel(1), NoisyModel(1)  # the same wandering, frame by frame
    per_frame = [jittery.process(f).background for f in frames]
    smooth = ChangeFilter(alpha=0.2)
    smoothed = [smooth(f, model.process(f).background) for f in frames]
    assert flicker(smoothed, frames) < 0.5 * flicker(per_frame, frames)
    # Where the frame moved, the output is the frame's own, at once (no trail of the last frames' change).
    moved = np.abs(frames[-1] - frames[-2]).max(axis=2) > 0.1
    moved_neighbourhood = cv2.dilate(moved.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert moved.any() and np.array_equal(smoothed[-1][moved], per_frame[-1][moved])
    assert not np.array_equal(smoothed[-1][~moved_neighbourhood], per_frame[-1][~moved_neighbourhood])
    # A change that jumps (an object's halo, a scene cut) is followed at once, not smeared over frames.
    model.offset = 0.2
    jumped = smooth(frames[-1], model.process(frames[-1]).background)
    np.testing.assert_allclose(jumped, frames[-1] - 0.2, atol=4 * model.wander)
    # A new frame size starts afresh.
    small = np.full((8, 8, 3), 0.5, np.float32)
    assert np.array_equal(smooth(small, small * 0.5), small * 0.5)
    with pytest.raises(InputError, match="motion_threshold"):
        ChangeFilter(motion_threshold=1.5)


def test_video_session_takes_a_new_strength_at_the_next_frame():
    frame = np.full((16, 16, 3), 0.6, np.float32)
    model = NoisyModel(2)
    session = VideoSession(model, temporal=True)
    for _ in range(5):
        session.remove(frame, colour_order="RGB")
    session.strength = 0.0
    assert np.array_equal(session.remove(frame, colour_order="RGB"), frame)  # not a drift over frames
    assert "temporal=True" in repr(session)


def test_a_strength_slider_dragged_frame_by_frame_keeps_its_smoothing():
    frame = np.full((16, 16, 3), 0.6, np.float32)
    jittery, model = NoisyModel(4), NoisyModel(4)
    session = VideoSession(model, temporal=True)
    smoothed, per_frame = [], []
    for t in range(20):
        jittery.strength = model.strength = 1.0 - 0.01 * t  # a new strength at every frame
        per_frame.append(jittery.process(frame).background)
        smoothed.append(session.remove(frame, colour_order="RGB"))
    assert flicker(smoothed, [frame] * 20) < 0.5 * flicker(per_frame, [frame] * 20)
    # Grey frames after colour ones of the same size are another stream: the averages start afresh, so a
    # change smaller than a jump is taken as it is, not averaged with the colour frames' (0.498).
    steady = NoisyModel(5, wander=0.0)
    session = VideoSession(steady, temporal=True)
    for _ in range(5):
        session.remove(frame, colour_order="RGB")
    steady.offset = 0.11
    assert session.remove(np.full((16, 16), 0.6, np.float32), colour_order="RGB") == pytest.approx(0.49, abs=1e-5)


def test_noisy_video_is_still_smoothed():
    """Sensor noise of 8 levels (low light) moves every pixel's grey level by more than the 6-level
    threshold: the difference is averaged over 5x5 pixels before its magnitude is taken, so noise, whose
    sign changes from pixel to pixel, averages out and a static frame does not count as moving."""
    rng = np.random.default_rng(8)
    scene = cv2.GaussianBlur(rng.uniform(0.3, 0.7, (48, 64, 3)).astype(np.float32), (0, 0), 2)
    smooth, changes, per_frame = ChangeFilter(), [], []
    for _ in range(30):
        frame = np.clip(scene + rng.normal(0, 8 / 255, scene.shape), 0, 1).astype(np.float32)
        change = (0.1 + rng.normal(0, 0.006, scene.shape[:2]))[..., None].astype(np.float32)
        per_frame.append(-change)
        changes.append(smooth(frame, frame - change) - frame)
    wander = [np.std(np.array(c[5:]), axis=0).mean() for c in (changes, per_frame)]
    assert wander[0] < 0.5 * wander[1]


def test_a_scene_cut_restarts_the_colour_average():
    """A cut to a scene whose colour ratio differs by less than reset_ratio would carry the old ratio over."""
    rng = np.random.default_rng(6)
    # Two photo-like scenes (colour fields and shapes), not pixel noise, which any threshold calls a cut.
    first, second = (smooth_photo(rng, 48, 64).astype(np.float32) / 255 for _ in range(2))
    session, jittery = VideoSession(GainModel(7), temporal=True), GainModel(7)
    for _ in range(8):
        session.remove(first, colour_order="RGB")
        jittery.process(first)
    cut = session.remove(second, colour_order="RGB")
    # The frame's own colour: off by the 8 frames' average ratio, every pixel would be off by about 1 %.
    off = np.abs(cut - jittery.process(second).background)
    assert np.mean(off < 1e-6) > 0.99 and off.mean() < 1e-3


def test_flicker_is_zero_for_a_pixelwise_model_and_the_sequence_holds_static_pixels():
    frames = flicker_sequence(frames=6, height=48, width=64)
    assert len(frames) == 6 and frames[0].shape == (48, 64, 3)
    assert flicker([frames[0]] * 6, frames) == 0.0
    # a pixelwise model changes its output where the input stayed put by less than the input moved
    assert flicker([f * 0.9 for f in frames], frames) < 0.9 * 0.5
    static = np.abs(frames[1] - frames[0]).max(axis=2) < 0.5 / 255
    assert 0.3 < static.mean() < 1.0


def test_video_session_carries_rm2s_centres_on_the_cpu_middle_step(tmp_path):
    remover = open_model(make_rm2s_export(tmp_path / "rm2s"))
    session = VideoSession(remover, temporal=True)
    seen = []
    centre_filter = session.settings.centre_filter

    def spy(low, high):
        seen.append((low, high))
        return centre_filter(low, high)

    session.settings = dataclasses.replace(session.settings, centre_filter=spy)
    frames = flicker_sequence(frames=3, height=40, width=56)
    outputs = [session.remove(f, colour_order="RGB") for f in frames]
    assert len(seen) == 3 and all(o.shape == frames[0].shape for o in outputs)
    plain = VideoSession(remover, temporal=False)
    assert plain.settings.centre_filter is None
    np.testing.assert_allclose(plain.remove(frames[0], colour_order="RGB"), remover.remove(frames[0], "RGB"),
                               atol=1e-6)
    measured = measure_flicker(remover, frames=4, size=(40, 56))
    assert set(measured) == {"per_frame", "temporal", "deviation"} and all(v >= 0 for v in measured.values())


def test_video_command_takes_temporal_on_and_keeps_every_frame(tmp_path):
    import cv2
    import dereflect.cli

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (56, 40))
    for frame in flicker_sequence(frames=5, height=40, width=56):
        writer.write((frame[:, :, ::-1] * 255).astype(np.uint8))
    writer.release()
    export = make_rm2s_export(tmp_path / "rm2s")
    for mode in ("on", "off"):
        out = tmp_path / f"clean_{mode}.avi"
        assert dereflect.cli.main(["video", str(clip), "-o", str(out), "--model", str(export), "--temporal", mode,
                                   "--no-progress"]) == 0
        capture = cv2.VideoCapture(str(out))
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
        capture.release()


def test_eval_flicker_at_a_strength_says_so_and_strength_zero_does_not_flicker(tmp_path, monkeypatch, capsys):
    import dereflect.cli

    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.tools.evaluate",))
    export = make_rm2s_export(tmp_path / "rm2s")
    assert dereflect.cli.main(["eval", str(export), "--flicker", "--strength", "0"]) == 0
    printed = capsys.readouterr().out
    assert "at strength 0 " in printed
    still = [float(x) for x in re.findall(r"(?:per frame|smoothing) ([0-9.]+)", printed)]
    assert dereflect.cli.main(["eval", str(export), "--flicker"]) == 0
    printed = capsys.readouterr().out
    assert "at strength" not in printed
    model = [float(x) for x in re.findall(r"(?:per frame|smoothing) ([0-9.]+)", printed)]
    # At strength 0 the output is the input: what is left is the input's own change under the static threshold.
    assert len(still) == len(model) == 2 and max(still) < 0.01 < 0.1 < min(model)


def test_video_session_hands_the_strength_to_its_remover(tmp_path):
    remover = open_model(make_crrn_export(tmp_path / "crrn"))
    session = VideoSession(remover, temporal=False)
    frame = flicker_sequence(frames=1, height=40, width=56)[0]
    assert session.strength == 1.0
    session.strength = 0
    assert remover.strength == 0.0
    np.testing.assert_array_equal(session.remove(frame, colour_order="RGB"), frame)
    with pytest.raises(InputError, match="strength must be a number from 0 to 2"):
        session.strength = 5
    without = types.SimpleNamespace(settings=None, background_of=None)  # a remover that takes no strength
    assert VideoSession(without, temporal=False).strength is None


def test_video_session_refuses_a_temporal_that_is_not_a_bool_and_a_closed_remover(tmp_path):
    with pytest.raises(InputError, match="temporal must be True or False, not 'off'"):
        VideoSession(GainModel(), temporal="off")  # the CLI's spelling: a true string
    assert VideoSession(GainModel(), temporal=np.bool_(False)).temporal is False
    remover = open_model(make_crrn_export(tmp_path / "crrn"))
    remover.close()
    with pytest.raises(InputError, match="is closed; open the model again"):
        VideoSession(remover)
