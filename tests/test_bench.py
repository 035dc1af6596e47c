"""dereflect.tools.bench and dereflect.tools.flops: statistics, the variation flag, FLOP and byte counts on
hand-built graphs, floors, and ``dereflect bench`` end to end on a toy export directory."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bench_fixtures import (
    CONV_MODEL_WEIGHTS,
    TOY_STAGE1_FLOPS_PER_PIXEL,
    TOY_STAGE2_FLOPS_PER_PIXEL,
    conv_model,
    conv_model_flops,
    make_bench_export,
    padded_model,
    padded_model_flops,
)
from dereflect.errors import InputError, MissingDependencyError
from dereflect.methods.base import CudaEventTimer, MonotonicTimer
from dereflect.tools import bench
from dereflect.tools.flops import (
    MIDDLE_STEP_FLOPS_PER_PIXEL,
    Cost,
    device_for_gpu,
    device_spec,
    middle_step_cost,
    network_cost,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return make_bench_export(tmp_path_factory.mktemp("bench-export"))


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """The toy export with a manifest max_side of 32, as the bundled models' say 224: larger frames are resampled."""
    return make_bench_export(tmp_path_factory.mktemp("bench-export-32"), max_side=32)


def _bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    return parser.parse_args(["bench", *map(str, argv)])


# -- sizes, statistics, variation -----------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("256", ("256", 256, 256)), ("720p", ("720p", 720, 1280)), ("1080p", ("1080p", 1080, 1920)),
    ("480p", ("480p", 480, 854)), ("480x640", ("480x640", 480, 640)), (" 2160P ", ("2160p", 2160, 3840)),
    ("4k", ("4k", 2160, 3840)),  # a name export engine's --opt takes
])
def test_parse_size(text, expected):
    assert bench.parse_size(text) == expected


def test_bench_sizes_and_engine_shapes_share_one_grammar():
    from dereflect.trt_api import NAMED_SIZES, parse_shape

    for name, (height, width) in NAMED_SIZES.items():
        assert bench.parse_size(name)[1:] == (height, width) == parse_shape(name, 3)[2:]
    assert bench.parse_size("480x640")[1:] == parse_shape("480x640", 3)[2:]


@pytest.mark.parametrize("text", ["", "abc", "0", "12x", "720i", "99999", "600p", "1x3x64x64", "256,", "256,,720p"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError):
        bench.parse_sizes(text)


@pytest.mark.parametrize("text, message", [
    ("256,256", r"--sizes gives 256x256 twice \(256 and 256\)"),
    ("720p,32,720x1280", r"--sizes gives 720x1280 twice \(720p and 720x1280\)"),
    ("2160p,4k", r"twice \(2160p and 4k\)"),
])
def test_parse_sizes_refuses_a_size_given_twice(text, message):
    with pytest.raises(InputError, match=message):
        bench.parse_sizes(text)


def test_summarize_known_data():
    stats = bench.summarize(np.arange(1, 101))
    assert stats["runs"] == 100
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["median_ms"] == pytest.approx(50.5)
    # Linear interpolation between order statistics: p90 = 90 + 0.1, p99 = 99 + 0.01.
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == 100 and stats["min_ms"] == 1
    assert stats["fps"] == pytest.approx(1000 / 50.5)
    assert stats["std_ms"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))


def test_variation_flag():
    steady = bench.summarize([10.0] * 19 + [10.2])
    assert not steady["variable"] and steady["cov"] < 0.01
    # Median unchanged, but the slow tail moves p90 far from it: flagged, as trtexec would.
    tail = bench.summarize([10.0] * 17 + [13.0, 14.0, 15.0])
    assert tail["median_ms"] == 10.0 and tail["p90_spread"] > 0.05 and tail["variable"]
    assert bench.is_variable(0.06, 0.0) and bench.is_variable(0.0, 0.06)
    assert not bench.is_variable(0.04, 0.04)
    assert not bench.is_variable(0.04, 0.04, threshold=0.05) and bench.is_variable(0.04, 0.04, threshold=0.03)
    assert bench.variation_excess(0.085, 0.019) == {"CoV": 0.085}
    assert bench.variation_excess(0.01, 0.06) == {"(p90 - median)/median": 0.06}
    # From fewer runs than p90 is shown from, it is not tested either (the table says n/a)
    few = bench.summarize([10.0, 10.0, 10.0, 10.0, 15.0])
    assert few["p90_spread"] == 0.0 and few["variable"] == (few["cov"] > bench.VARIATION_THRESHOLD)
    with pytest.raises(InputError):
        bench.summarize([])
    with pytest.raises(InputError):
        bench.summarize([1.0, float("nan")])


def test_monotonic_timer_stages_and_total():
    timer = MonotonicTimer()
    with timer.stage("a"):
        time.sleep(0.01)
    with timer.stage("b"):
        time.sleep(0.02)
    times = timer.read()
    assert set(times) == {"a", "b", "total"}
    assert times["a"] >= 9 and times["b"] >= 19
    assert times["total"] >= times["a"] + times["b"]
    calls = []
    synced = MonotonicTimer(sync=lambda: calls.append(1))
    with synced.stage("x"):
        pass
    assert len(calls) == 2


# -- FLOPs, bytes, floors ----------------------------------------------------------------------------

def test_flops_conv_and_conv_transpose():
    cost = network_cost(conv_model(), 8, 8)
    assert cost.flops == conv_model_flops(8, 8) == 30720
    assert cost.flops_by_op["ConvTranspose"] == 2 * (4 * 64) * (2 * 16)
    assert cost.flops_by_op["Conv"] == 2 * (4 * 64) * 27 + 4 * 64
    assert cost.flops_by_op["Relu"] == 4 * 64
    assert cost.uncounted == []
    # Weights once + input (3 x 8 x 8) + output (2 x 16 x 16), float32; activations: Conv and Relu outputs.
    assert cost.min_bytes == 4 * (CONV_MODEL_WEIGHTS + 3 * 64 + 2 * 256)
    assert cost.activation_bytes == 4 * (2 * 4 * 64)
    half = network_cost(conv_model(), 8, 8, element_bytes=2)
    assert half.min_bytes == cost.min_bytes / 2 and half.flops == cost.flops
    assert network_cost(conv_model(), 16, 24, batch=2).flops == 2 * conv_model_flops(16, 24)


@pytest.mark.parametrize("height,width", [(32, 32), (30, 30), (33, 17)])
def test_flops_fold_pad_to_stride(height, width):
    cost = network_cost(padded_model(), height, width)
    assert cost.flops == padded_model_flops(height, width)
    assert cost.uncounted == []
    # Input and output at the requested size (the crop), not the padded one.
    assert cost.min_bytes == 4 * (6 + 3 * height * width + 2 * height * width)


def test_flops_of_a_file_and_missing_onnx(tmp_path, monkeypatch, export_dir):
    cost = network_cost(export_dir / "stage1.onnx", 20, 30)
    assert cost.flops == TOY_STAGE1_FLOPS_PER_PIXEL * 600 and cost.name == "stage1.onnx"
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'dereflect\[export\]'"):
        network_cost(export_dir / "stage1.onnx", 20, 30)


def test_middle_step_cost():
    pixels = 100 * 200
    per_pixel_flops = sum(MIDDLE_STEP_FLOPS_PER_PIXEL.values())
    fp32 = middle_step_cost(100, 200)
    assert fp32.flops == pixels * per_pixel_flops
    # float32 B1: storing C (12 + 12 + 4 + 4 + 12 = 44) beats recomputing (2 x 24 = 48); 9 x 4 out.
    assert fp32.min_bytes == pixels * (44 + 36)
    # FP16 B1: recomputing (2 x (12 + 6) = 36) beats storing (38); 9 x 2 out.
    assert middle_step_cost(100, 200, b1_bytes=2, out_bytes=2).min_bytes == pixels * (36 + 18)
    assert fp32.kind == "scalar"


def test_floor_and_device_table():
    custom = device_spec("custom:1000,100")
    assert (custom.fp16_tflops, custom.bandwidth_gbps, custom.fp32_tflops) == (1000.0, 100.0, None)
    compute_heavy = Cost("net", flops=2e13, min_bytes=1e8)
    assert compute_heavy.floor_ms(custom) == pytest.approx(20.0)
    assert compute_heavy.bound(custom) == "compute"
    memory_heavy = Cost("net", flops=2e12, min_bytes=1e9)
    assert memory_heavy.floor_ms(custom) == pytest.approx(10.0) and memory_heavy.bound(custom) == "memory"
    # Scalar work uses the FP32 rate when the table has one.
    scalar = Cost("step", flops=6.7e10, min_bytes=0.0, kind="scalar")
    assert scalar.floor_ms(device_spec("h100")) == pytest.approx(1.0)
    assert scalar.floor_ms(custom) == pytest.approx(0.067)
    assert device_spec("AGX-Orin").bandwidth_gbps == 204.8
    assert device_spec("orin-nano").fp16_tflops == 10.0
    assert device_for_gpu("NVIDIA H100 80GB HBM3").key == "h100"
    assert device_for_gpu("NVIDIA H200").key == "h200"
    assert device_for_gpu("Orin (nvgpu)") is None
    for bad in ("a100", "custom:1", "custom:-1,2", "custom:x,y"):
        with pytest.raises(InputError, match="custom:TFLOPS,GBPS"):
            device_spec(bad)


# -- the command ---------------------------------------------------------------------------------------

def test_device_table_matches_only_the_device_in_use(monkeypatch):
    import dereflect.trt_api

    monkeypatch.setattr(dereflect.trt_api, "gpu_info", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))
    assert bench.table_matches(device_spec("h100"), on_gpu=True)
    assert not bench.table_matches(device_spec("agx-orin"), on_gpu=True)
    assert not bench.table_matches(device_spec("h100"), on_gpu=False)  # timed on the CPU
    assert bench.table_matches(device_spec("custom:1,2"), on_gpu=False)  # the user's own figures for their device
    assert bench.device_in_use(True) == "NVIDIA H100 80GB HBM3"
    assert bench.resolve_device_table("auto", on_gpu=True).key == "h100"


@pytest.mark.parametrize("board, mem_total_kb, matching, auto", [
    ("NVIDIA Jetson AGX Orin Developer Kit", 64_312_000, {"agx-orin"}, "agx-orin"),  # 61.3 GiB
    ("NVIDIA Jetson AGX Orin Developer Kit", 31_964_000, {"agx-orin-32gb"}, "agx-orin-32gb"),  # 30.5 GiB
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15_655_000, {"orin-nx-16gb"}, "orin-nx-16gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 7_620_000, {"orin-nx-8gb"}, "orin-nx-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", None, {"orin-nx-16gb", "orin-nx-8gb"}, None),
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7_620_000,
     {"orin-nano", "orin-nano-super"}, None),
    ("NVIDIA Jetson Orin Nano Developer Kit", 3_700_000, set(), None),  # a 4GB Nano: not in the table
    (None, 7_620_000, set(), None),
])
def test_device_table_on_a_jetson_goes_by_the_board(monkeypatch, tmp_path, board, mem_total_kb, matching, auto):
    """Every Orin's GPU is called "Orin": the device tree's board name and the module's memory tell which
    table entry it is; where they leave two, auto picks neither."""
    import dereflect.trt_api
    from dereflect.tools import flops

    monkeypatch.setattr(dereflect.trt_api, "gpu_info", lambda: ("Orin", "8.7"))
    model = tmp_path / "model"
    if board:
        model.write_bytes(board.encode() + b"\0")
    monkeypatch.setattr(dereflect.trt_api, "DEVICE_TREE_MODEL", (tmp_path / "missing", model))
    meminfo = tmp_path / "meminfo"
    if mem_total_kb:
        meminfo.write_text(f"MemTotal:       {mem_total_kb} kB\nMemFree:         1000 kB\n")
    monkeypatch.setattr(dereflect.trt_api, "MEMINFO", meminfo)
    assert dereflect.trt_api.jetson_model() == board
    assert {key for key in flops.DEVICE_TABLE if bench.table_matches(device_spec(key), on_gpu=True)} == matching
    found = bench.resolve_device_table("auto", on_gpu=True)
    assert (found.key if found else None) == auto


def test_bench_command_writes_json_and_png(export_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # Custom rates describe the device in use: the floors are a comparison, with multiples.
    args = _bench_args(export_dir, "--sizes", "32,40x48", "--warmup", "1", "--runs", "4", "--out", out,
                       "--device-table", "custom:42,204.8,5.3")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "40x48" in printed and "FPS" in printed and "x floor" in printed and "PREDICTED" not in printed
    report = json.loads((out / "bench.json").read_text())
    assert report["format"] == "dereflect-bench" and report["backend"] == "onnxruntime"
    assert report["stages"] == ["upload", "stage1", "middle", "stage2", "download"]
    assert report["device_table"]["key"] == "custom" and "onnxruntime" in report["machine"]
    assert report["floors"] == "comparison"
    assert [e["label"] for e in report["sizes"]] == ["32", "40x48"]
    entry = report["sizes"][1]
    assert (entry["height"], entry["width"]) == (40, 48)
    for name in report["stages"]:
        stats = entry["stages"][name]
        assert stats["runs"] == 4 and len(entry["samples_ms"][name]) == 4
        assert stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    # The run's total covers every stage.
    assert entry["total"]["median_ms"] >= entry["stages"]["stage1"]["median_ms"]
    assert entry["costs"]["stage1"]["gflop"] * 1e9 == pytest.approx(TOY_STAGE1_FLOPS_PER_PIXEL * 40 * 48)
    assert entry["costs"]["stage2"]["gflop"] * 1e9 == pytest.approx(TOY_STAGE2_FLOPS_PER_PIXEL * 40 * 48)
    limits = entry["limits"]
    floors = limits["floor_ms"]
    assert floors["total"] == pytest.approx(floors["stage1"] + floors["middle"] + floors["stage2"])
    assert floors["middle"] == pytest.approx(middle_step_cost(40, 48).floor_ms(device_spec("custom:42,204.8,5.3")))
    assert limits["ratio"]["stage1"] == pytest.approx(entry["stages"]["stage1"]["median_ms"] / floors["stage1"])
    assert limits["ratio"]["total"] == pytest.approx(entry["total"]["median_ms"] / floors["total"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_another_devices_table_is_a_prediction_not_a_comparison(export_dir, tmp_path, capsys):
    """agx-orin named while timing this machine's CPU: Orin's floors, but no multiples of them."""
    args = _bench_args(export_dir, "--sizes", "32", "--warmup", "0", "--runs", "2", "--out", tmp_path,
                       "--device-table", "agx-orin", "--no-plot")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "PREDICTED floors for Jetson AGX Orin 64GB" in printed and "not a comparison" in printed
    assert "x floor" not in printed.split("note:")[0]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["floors"] == "prediction" and report["device_in_use"] == bench._cpu_name()
    limits = report["sizes"][0]["limits"]
    assert limits["prediction"] is True and "ratio" not in limits
    assert limits["floor_ms"]["middle"] == pytest.approx(middle_step_cost(32, 32).floor_ms(device_spec("agx-orin")))
    assert any("prediction for Jetson AGX Orin 64GB, not a comparison" in n for n in report["notes"])


def test_bench_on_the_cpu_says_how_to_get_floors(export_dir, tmp_path, capsys):
    args = _bench_args(export_dir, "--sizes", "16", "--warmup", "0", "--runs", "1", "--out", tmp_path, "--no-plot")
    assert args.func(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["floors"] is None and "limits" not in report["sizes"][0]
    assert any(n.startswith("no floors: --device-table auto") and "this run is on the CPU" in n
               for n in report["notes"])


def test_bench_without_matplotlib_or_onnx(export_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    args = _bench_args(export_dir, "--sizes", "24", "--warmup", "0", "--runs", "2", "--out", tmp_path,
                       "--device-table", "h100")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "plot skipped: it needs matplotlib (pip install matplotlib)" in printed
    assert printed.count("no FLOPs, bytes or floors:") == 1 and "pip install 'dereflect[export]'" in printed
    assert not (tmp_path / "bench.png").exists()
    entry = json.loads((tmp_path / "bench.json").read_text())["sizes"][0]
    assert entry["costs"] is None and "dereflect[export]" in entry["costs_error"]
    assert entry["total"]["runs"] == 2


def test_bench_help_promises_only_what_is_written():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    text = " ".join(parser._subparsers._group_actions[0].choices["bench"].format_help().split())
    assert "bench.png where matplotlib is installed (pip install matplotlib)" in text
    assert "need the onnx package (pip install 'dereflect[export]')" in text


def test_bench_reports_a_failing_size(export_dir, tmp_path, capsys, monkeypatch):
    calls = []

    def flaky(pipeline, label, *args, **kwargs):
        calls.append(label)
        if label == "32":
            raise InputError("outside the engine's profile")
        return original(pipeline, label, *args, **kwargs)

    original = bench.bench_size
    monkeypatch.setattr(bench, "bench_size", flaky)
    args = _bench_args(export_dir, "--sizes", "32,24", "--warmup", "0", "--runs", "1", "--out", tmp_path,
                       "--no-plot")
    assert args.func(args) == 1
    report = json.loads((tmp_path / "bench.json").read_text())
    assert calls == ["32", "24"]
    assert report["sizes"][0]["error"] == "outside the engine's profile" and "total" in report["sizes"][1]
    assert "error: outside" in capsys.readouterr().out
    args = _bench_args(export_dir, "--sizes", "32", "--warmup", "0", "--runs", "1", "--out", tmp_path, "--no-plot",
                       "--overwrite")
    assert args.func(args) == 2  # every size failed: nothing measured


def test_the_variation_warning_names_only_the_figures_above_the_limit(export_dir, monkeypatch):
    """CoV 8.5 % with (p90 - median)/median 1.9 %: only the CoV is over 5 %, and only it is printed."""
    samples = [10.0] * 9 + [10.2] + [13.0, 7.0] * 2 + [10.0] * 6
    stats = bench.summarize(samples)
    assert stats["cov"] > 0.05 > stats["p90_spread"]
    monkeypatch.setattr(bench, "time_stages", lambda *args, **kwargs: {"total": samples})
    pipeline = bench.BenchPipeline(export_dir)
    try:
        entry = bench.bench_size(pipeline, "32", 32, 32, 0, len(samples), None)
    finally:
        pipeline.close()
    [warning] = entry["warnings"]
    assert f"(CoV {100 * stats['cov']:.3g}% > 5%)" in warning and "p90" not in warning


def test_percentiles_from_too_few_runs_are_not_shown(export_dir, tmp_path, capsys):
    args = _bench_args(export_dir, "--sizes", "16", "--warmup", "0", "--runs", "2", "--out", tmp_path, "--no-plot")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    total = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["total"])
    assert total[3:5] == ["n/a", "n/a"]  # total, mean, median, p90, p99
    assert "p90 and p99 not shown: from 2 runs" in printed and "p99 needs --runs 100 or more" in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["sizes"][0]["total"]["p99_ms"] > 0  # the figure itself stays in the JSON
    args = _bench_args(export_dir, "--sizes", "16", "--warmup", "0", "--runs", "10", "--out", tmp_path, "--no-plot",
                       "--overwrite")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    total = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["total"])
    assert total[3] != "n/a" and total[4] == "n/a"
    assert "p99 not shown: from 10 runs" in printed and "p90 and" not in printed


def test_bench_refuses_an_earlier_report_without_overwrite(export_dir, tmp_path, capsys, monkeypatch):
    from dereflect.cli import main

    (tmp_path / "bench.json").write_text("{}")
    timed = []
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: timed.append(1))
    argv = ["bench", str(export_dir), "--sizes", "16", "--warmup", "0", "--runs", "1", "--out", str(tmp_path)]
    assert main(argv) == 2 and not timed
    err = capsys.readouterr().err
    assert err == f"dereflect: error: {tmp_path / 'bench.json'}: file exists; pass --overwrite to replace it\n"
    (tmp_path / "bench.png").write_bytes(b"png")
    assert main(argv) == 2 and "bench.json, bench.png exist already" in capsys.readouterr().err
    monkeypatch.undo()
    (tmp_path / "bench.json").unlink()
    assert main(argv + ["--no-plot"]) == 0  # it writes no bench.png: the earlier one is no reason to stop
    assert main(argv + ["--no-plot"]) == 2 and "bench.json: file exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["runs"] == 1


def test_the_plot_shows_the_machine_and_date(export_dir, tmp_path):
    report = bench.run_bench(export_dir, [("16", 16, 16)], warmup=0, runs=1, device_table="none")
    title = bench.plot_title(report)
    assert report["device_in_use"] in title and report["machine"]["platform"] in title
    assert report["created"][:10] in title and "UTC" in title


def test_the_clock_note_says_what_upload_and_download_are(export_dir, monkeypatch):
    from dereflect.backends.base import HostExecutor
    from dereflect.methods.base import EventTimer

    pipeline = bench.BenchPipeline(export_dir)
    pipeline.close()
    assert "upload/download are the frame's layout conversions on the host" in pipeline.notes[0]
    monkeypatch.setattr(HostExecutor, "timer", lambda self: EventTimer())  # as a device executor's
    pipeline = bench.BenchPipeline(export_dir)
    pipeline.close()
    assert "upload is the frame's copy to the GPU, download the result's copy back" in pipeline.notes[0]
    assert "layout conversions" not in pipeline.notes[0]


def test_bench_reports_a_failed_graph_capture(export_dir, monkeypatch):
    from dereflect.backends.base import HostExecutor

    report = bench.run_bench(export_dir, [("16", 16, 16)], warmup=0, runs=1, device_table="none")
    assert not any("graph capture" in note for note in report["notes"])
    # As TensorRT's device executor records it when capture fails.
    monkeypatch.setattr(HostExecutor, "graph_capture_error", "RuntimeError: capture refused", raising=False)
    report = bench.run_bench(export_dir, [("16", 16, 16)], warmup=0, runs=1, device_table="none")
    assert any(note.startswith("CUDA graph capture failed (RuntimeError: capture refused): every frame was "
                               "enqueued without a graph") for note in report["notes"])


def test_bench_bad_options(export_dir, tmp_path):
    with pytest.raises(InputError, match="--runs"):
        bench.run_bench(export_dir, [("8", 8, 8)], runs=0)
    with pytest.raises(InputError, match="threshold"):
        bench.run_bench(export_dir, [("8", 8, 8)], threshold="median")
    with pytest.raises(InputError, match="device table"):
        bench.run_bench(export_dir, [("8", 8, 8)], device_table="a100")


def test_bench_times_what_remove_runs_for_a_frame_larger_than_max_side(small_export):
    """Downscale, the networks at the reduced size, upsample: remove's own result, every stage timed."""
    from dereflect import Remover

    pipeline = bench.BenchPipeline(small_export)
    try:
        assert pipeline.remover.network_size(40, 64) == (20, 32) and pipeline.remover.network_size(24, 32) == (24, 32)
        image = bench.synthetic_frame(40, 64)
        timer = pipeline.timer()
        background = pipeline.run_frame(image, timer)
        times = timer.read()
    finally:
        pipeline.close()
    with Remover.load(small_export) as remover:
        np.testing.assert_array_equal(background, remover.process(image).background)
    assert list(times) == ["downscale", "upload", "stage1", "middle", "stage2", "download", "upsample", "total"]
    assert times["total"] >= sum(value for name, value in times.items() if name != "total")


def test_bench_runs_the_networks_at_the_models_max_side(small_export, tmp_path, capsys):
    args = _bench_args(small_export, "--sizes", "24x32,40x64", "--warmup", "0", "--runs", "1", "--out", tmp_path,
                       "--device-table", "custom:42,204.8,5.3", "--no-plot")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "networks at up to 32x32, larger frames scaled down as remove does" in printed
    assert "24x32 (networks at 24x32)" in printed and "40x64 (networks at 20x32)" in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["max_hw"] == [32, 32]
    fits, large = report["sizes"]
    assert list(fits["stages"]) == ["upload", "stage1", "middle", "stage2", "download"]
    assert (large["height"], large["width"], large["network_height"], large["network_width"]) == (40, 64, 20, 32)
    assert list(large["stages"]) == ["downscale", "upload", "stage1", "middle", "stage2", "download", "upsample"]
    # Costs and floors are the networks' at the size they ran at; the resampling has no floor.
    assert large["costs"]["stage1"]["gflop"] * 1e9 == pytest.approx(TOY_STAGE1_FLOPS_PER_PIXEL * 20 * 32)
    assert large["costs"]["stage2"]["gflop"] * 1e9 == pytest.approx(TOY_STAGE2_FLOPS_PER_PIXEL * 20 * 32)
    floors = large["limits"]["floor_ms"]
    assert floors["middle"] == pytest.approx(middle_step_cost(20, 32).floor_ms(device_spec("custom:42,204.8,5.3")))
    assert set(floors) == {"stage1", "middle", "stage2", "total"}
    assert floors["total"] == pytest.approx(floors["stage1"] + floors["middle"] + floors["stage2"])
    assert large["limits"]["ratio"]["total"] == pytest.approx(large["total"]["median_ms"] / floors["total"])
    assert any(n.startswith("frames larger than 32x32 run as remove runs them") and n.endswith("no floor")
               for n in report["notes"])


@pytest.mark.parametrize("max_side, networks, header", [
    ("0", (40, 64), "networks at each frame's full resolution (no max side)"),
    ("48", (30, 48), "networks at up to 48x48"),
])
def test_bench_max_side_option(small_export, tmp_path, capsys, max_side, networks, header):
    args = _bench_args(small_export, "--sizes", "40x64", "--max-side", max_side, "--warmup", "0", "--runs", "1",
                       "--out", tmp_path, "--no-plot")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert header in printed and f"40x64 (networks at {networks[0]}x{networks[1]})" in printed
    entry = json.loads((tmp_path / "bench.json").read_text())["sizes"][0]
    assert (entry["network_height"], entry["network_width"]) == networks
    pixels = networks[0] * networks[1]
    assert entry["costs"]["stage2"]["gflop"] * 1e9 == pytest.approx(TOY_STAGE2_FLOPS_PER_PIXEL * pixels)
    assert ("downscale" in entry["stages"]) == (networks != (40, 64))


def test_bench_takes_max_side_but_not_the_output_options():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["bench"].format_help()
    assert "--max-side" in text and "--large-image" not in text and "--strength" not in text


def test_bench_of_a_bundled_model_runs_at_its_max_side():
    """crrn-lite's manifest says 224: a 240x320 frame runs its network at 168x224, as remove does."""
    report = bench.run_bench("crrn-lite", [("240x320", 240, 320)], warmup=0, runs=1, device_table="none")
    entry = report["sizes"][0]
    assert report["max_hw"] == [224, 224] and (entry["network_height"], entry["network_width"]) == (168, 224)
    assert list(entry["stages"]) == ["downscale", "upload", "crrn", "download", "upsample"]


@pytest.mark.parametrize("name, message", [
    ("keep.jpg", "keep.jpg: exists and is not a folder"),
    ("keep.jpg/sub", "keep.jpg is a file, not a folder"),
    ("x" * 300, "is 300 bytes; this file system allows"),
])
def test_bench_checks_the_output_folder_before_any_work(export_dir, tmp_path, capsys, monkeypatch, name, message):
    from dereflect.cli import main

    (tmp_path / "keep.jpg").write_bytes(b"jpeg")
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: pytest.fail("timed before checking --out"))
    argv = ["bench", str(export_dir), "--sizes", "16", "--warmup", "0", "--runs", "1", "--out", str(tmp_path / name)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("dereflect: error: ") and message in captured.err
    assert (tmp_path / "keep.jpg").read_bytes() == b"jpeg"


def test_bench_command_does_not_import_torch(export_dir, tmp_path):
    code = (
        "import argparse, sys\n"
        "from dereflect.tools import bench\n"
        "parser = argparse.ArgumentParser(); bench.register(parser.add_subparsers())\n"
        f"args = parser.parse_args(['bench', {str(export_dir)!r}, '--sizes', '16', '--warmup', '0', '--runs', '1',"
        f" '--out', {str(tmp_path)!r}, '--no-plot', '--device-table', 'h100'])\n"
        "assert args.func(args) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["sizes"][0]["costs"]["stage1"]["gflop"] > 0


# -- the authors' middle step (benchmarks/authors_baseline.py) --------------------------------------

def _benchmarks_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_authors_middle_step_matches_the_reference():
    pytest.importorskip("sklearn", reason="the authors' step uses scikit-learn (pip install 'dereflect[train]')")
    import cv2
    from dereflect.middle_step.reference import middle_step_reference

    image = bench.synthetic_frame(64, 96, seed=3)
    stage1 = cv2.GaussianBlur(image, (0, 0), 1.5)
    stage2_input, centres = _benchmarks_module("authors_baseline").authors_middle_step(image, stage1)
    reference = middle_step_reference(image, stage1)
    # Lloyd's iterations stop near the exact 2-means optimum, not on it: masks agree but for a few pixels.
    assert centres["low"] == pytest.approx(reference.low, abs=0.01)
    assert centres["high"] == pytest.approx(reference.high, abs=0.01)
    differing = np.any(stage2_input != reference.stage2_input, axis=2).mean()
    assert differing < 0.002
    np.testing.assert_array_equal(stage2_input[:, :, :3], image)


# -- GPU -----------------------------------------------------------------------------------------------

def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs torch with a CUDA GPU")
def test_cuda_event_timer():
    import torch

    timer = CudaEventTimer(torch)
    x = torch.rand(2048, 2048, device="cuda")
    with timer.stage("matmul"):
        x @ x
    with timer.stage("add"):
        x + 1
    times = timer.read()
    assert times["matmul"] > 0 and times["add"] > 0
    assert times["total"] >= times["matmul"] + times["add"] - 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs torch with a CUDA GPU")
def test_bench_torch_backend_on_cuda(tmp_path):
    export_dir = _benchmarks_module("random_export").make_random_export(tmp_path / "lite", "lite")
    report = bench.run_bench(export_dir, [("64", 64, 64)], backend="torch", device="cuda", precision="fp16",
                             warmup=1, runs=3, device_table="h100",
                             checkpoint=export_dir / "checkpoint.safetensors")
    entry = report["sizes"][0]
    assert "error" not in entry, entry.get("error")
    assert report["element_bytes"] == 2 and "cuda" in report["backend_detail"]
    assert entry["total"]["runs"] == 3 and entry["stages"]["middle"]["median_ms"] > 0
    assert entry["limits"]["ratio"]["total"] > 1
