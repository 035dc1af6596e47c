"""Corpus of broken, tampered and unusual checkpoints and engine sidecars, made here from tiny networks.

Every case has one expected outcome: it loads (weights bit-exact), or it raises the package's
ModelError with a one-line message naming the file and the problem. No case may change its
file (SHA-256 before and after), and through the CLI a refusal exits 2 with one
``dereflect: error:`` line and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from conftest import tiny_rm2s_networks  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.errors import ModelError  # noqa: E402
from dereflect.train.checkpoint import (  # noqa: E402
    MAX_METADATA_CHARS,
    MAX_METADATA_DEPTH,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from dereflect.train.models import build_model  # noqa: E402
from dereflect.trt_api import MAX_SIDECAR_BYTES, EngineInfo, derive_profile, read_engine_info  # noqa: E402
from safetensors.torch import load as load_bytes  # noqa: E402
from safetensors.torch import save as save_bytes  # noqa: E402

# --- building and tampering with files --------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> Dict[str, str]:
    """Every file under ``root`` by relative path, with its SHA-256: proves nothing was written or changed."""
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _split(data: bytes) -> Tuple[Dict[str, Any], bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def _join(header: Dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_header(data: bytes, edit: Callable[[Dict[str, Any]], None]) -> bytes:
    header, body = _split(data)
    edit(header)
    return _join(header, body)


def _metadata_text(data: bytes, text: str) -> bytes:
    """The file with its ``dereflect`` metadata string replaced (tensors untouched)."""
    return _edit_header(data, lambda header: header["__metadata__"].update(dereflect=text))


def _edit_metadata(data: bytes, edit: Callable[[Dict[str, Any]], None]) -> bytes:
    metadata = json.loads(_split(data)[0]["__metadata__"]["dereflect"])
    edit(metadata)
    return _metadata_text(data, json.dumps(metadata))


def _retensor(data: bytes, edit: Callable[[Dict[str, Any]], None]) -> bytes:
    """The file written again by safetensors with its tensors edited, the metadata kept."""
    tensors = load_bytes(data)
    edit(tensors)
    return save_bytes(tensors, metadata=_split(data)[0]["__metadata__"])


def _first_key(data: bytes, prefix: str, dtype: str) -> str:
    header, _ = _split(data)
    return sorted(k for k, v in header.items()
                  if k.startswith(prefix) and isinstance(v, dict) and v["dtype"] == dtype)[0]


def _relabel(data: bytes, prefix: str, old: str, new: str, shape: Callable[[list], list] = list) -> bytes:
    """Change one tensor's declared dtype (and shape) in the header; the bytes stay where they were."""
    key = _first_key(data, prefix, old)

    def edit(header):
        header[key]["dtype"] = new
        header[key]["shape"] = shape(header[key]["shape"])
    return _edit_header(data, edit)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"stage1/weight": torch.zeros(4)}, buffer)
    return buffer.getvalue()


def _with_optimizer(networks):
    """The generator after one Adam step: a resumable checkpoint carries moments and step counts."""
    generator = networks["generator"][2]
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    generator.train()
    generator(torch.rand(1, 9, 16, 16)).mean().backward()
    optimizer.step()
    generator.eval()
    return {"generator": optimizer}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Dict[str, Any]:
    """A resumable two-network RM2S checkpoint, as bytes, and the modules it was made from."""
    networks = tiny_rm2s_networks()
    optimizers = _with_optimizer(networks)
    path = save_checkpoint(tmp_path_factory.mktemp("base") / "rm2s.safetensors", method="rm2s", kind="rm2s-stage2",
                           networks=networks, step=3, optimizers=optimizers, training={"best_val_loss": None})
    return {"bytes": path.read_bytes(), "networks": networks, "optimizers": optimizers}


def _load_refused(path: Path) -> str:
    before = _sha256(path)
    with pytest.raises(ModelError) as caught:
        load_checkpoint(path)
    assert _sha256(path) == before
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and len(message) < 1000, message
    return message


# --- checkpoints that must load ---------------------------------------------------------------------


def _assert_same_weights(checkpoint, networks) -> None:
    assert set(checkpoint.states) == set(networks)
    for name, (_, _, module) in networks.items():
        rebuilt = checkpoint.build(name)
        for key, value in module.state_dict().items():
            assert rebuilt.state_dict()[key].dtype == value.dtype and torch.equal(rebuilt.state_dict()[key], value)


def test_a_resumable_checkpoint_loads_bit_exact_with_its_optimiser_state(base, tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(base["bytes"])
    before = _sha256(path)
    checkpoint = load_checkpoint(path)
    _assert_same_weights(checkpoint, base["networks"])
    assert checkpoint.step == 3 and checkpoint.metadata["kind"] == "rm2s-stage2"
    restored = torch.optim.Adam(checkpoint.build("generator").parameters(), lr=1e-3)
    restored.load_state_dict(checkpoint.optimizer_states["generator"])
    expected = base["optimizers"]["generator"].state_dict()["state"]
    for index, values in restored.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(value, expected[index][key]), (index, key)
    assert _sha256(path) == before


def _mobile_unet():
    from dereflect.train.models.rm2s import MobileUNetConfig

    config = MobileUNetConfig(decoder_widths=(8, 8, 8, 8, 4)).to_dict()
    return {"stage1": ("rm2s_mobile_unet", config, build_model("rm2s_mobile_unet", config))}


def _unet_with_critic():
    from dereflect.train.models.rm2s import DiscriminatorConfig

    networks = tiny_rm2s_networks()
    critic = DiscriminatorConfig(widths=(4, 8)).to_dict()
    networks["discriminator"] = ("rm2s_discriminator", critic, build_model("rm2s_discriminator", critic))
    return networks


def _crrn():
    from dereflect.train.models.crrn import CRRNConfig

    config = CRRNConfig.preset("lite", gin_widths=(4, 4, 8, 8, 8), vgg_widths=(4, 8, 8, 8, 8), fc_channels=8,
                               feat_width=4, iin_widths=(8, 8, 4, 4, 4)).to_dict()
    return {"crrn": ("crrn", config, build_model("crrn", config))}


def _crrn_mobile():
    from dereflect.train.models.crrn import MobileCRRNConfig

    config = MobileCRRNConfig(gin_widths=(4, 4, 4, 4, 4), decoder_widths=(8, 8, 8, 8, 4)).to_dict()
    return {"crrn": ("crrn_mobile", config, build_model("crrn_mobile", config))}


@pytest.mark.parametrize("method, kind, make", [
    ("rm2s", "rm2s-stage1", _mobile_unet),
    ("rm2s", "rm2s-stage2", _unet_with_critic),
    ("rm2s", "stage2", tiny_rm2s_networks),  # the toy kind some tests write
    ("crrn", "crrn", _crrn),
    ("crrn", "final", _crrn_mobile),
], ids=["rm2s_mobile_unet", "rm2s_unet+discriminator", "toy-kind-stage2", "crrn", "crrn_mobile"])
def test_checkpoints_of_every_architecture_and_kind_load(tmp_path, method, kind, make):
    torch.manual_seed(0)
    networks = make()
    path = save_checkpoint(tmp_path / "c.safetensors", method=method, kind=kind, networks=networks)
    before = _sha256(path)
    _assert_same_weights(load_checkpoint(path), networks)
    assert _sha256(path) == before


def test_a_minimal_hand_written_checkpoint_still_loads(tmp_path):
    """Only the required keys, as the first checkpoints and other tools wrote them; NaN (which Python's
    JSON writes for a diverged loss) in the free-form training record is no reason to refuse."""
    networks = tiny_rm2s_networks()
    metadata = {"format": "dereflect-checkpoint", "format_version": 1, "method": "rm2s", "kind": "stage2", "step": 0,
                "networks": {name: {"arch": arch, "config": config} for name, (arch, config, _) in networks.items()},
                "training": {"best_val_loss": math.nan}}
    tensors = {f"{name}/{key}": value.contiguous() for name, (_, _, module) in networks.items()
               for key, value in module.state_dict().items()}
    path = tmp_path / "old.safetensors"
    path.write_bytes(save_bytes(tensors, metadata={"dereflect": json.dumps(metadata)}))
    checkpoint = load_checkpoint(path)
    _assert_same_weights(checkpoint, networks)
    assert checkpoint.optimizer_states == {} and math.isnan(checkpoint.metadata["training"]["best_val_loss"])


# --- checkpoints that must be refused ---------------------------------------------------------------

#: (make the file from the base checkpoint's bytes, what the message must say, which read refuses it:
#: "metadata" = read_metadata already, "tensors" = only load_checkpoint, after the metadata passed)
BROKEN: Dict[str, Tuple[Callable[[bytes], bytes], str, str]] = {
    "float32 relabelled int32": (
        lambda d: _relabel(d, "stage1/", "F32", "I32"), r"network 'stage1' .*wrong dtype \S+ I32 != F32", "tensors"),
    "float32 relabelled float16, shape doubled": (
        lambda d: _relabel(d, "generator/", "F32", "F16", lambda s: [*s[:-1], s[-1] * 2]),
        r"network 'generator' .*wrong dtype \S+ F16 != F32; wrong shape", "tensors"),
    "int64 counter relabelled float64": (
        lambda d: _relabel(d, "stage1/", "I64", "F64"), r"wrong dtype \S+num_batches_tracked F64 != I64", "tensors"),
    "same bytes, another shape": (
        lambda d: _relabel(d, "stage1/", "F32", "F32", lambda s: [math.prod(s)]), r"wrong shape", "tensors"),
    "config not matching the weights": (
        lambda d: _edit_metadata(d, lambda m: m["networks"]["stage1"]["config"].update(widths=[4, 16])),
        r"network 'stage1' \(rm2s_unet\): weights do not match .*wrong shape", "tensors"),
    "a tensor missing": (
        lambda d: _retensor(d, lambda t: t.pop(_first_key(d, "generator/", "F32"))),
        r"network 'generator' .*missing \['", "tensors"),
    "an extra tensor in a network": (
        lambda d: _retensor(d, lambda t: t.update({"stage1/payload.weight": torch.zeros(3)})),
        r"unexpected \['payload.weight'\]", "tensors"),
    "a tensor of no network": (
        lambda d: _retensor(d, lambda t: t.update({"payload": torch.zeros(3)})),
        r"tensor 'payload' belongs to no network", "tensors"),
    "a listed network without tensors": (
        lambda d: _retensor(d, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("stage1/")]]),
        r"network 'stage1' is listed in the metadata but has no tensors", "tensors"),
    "optimiser state relabelled bool": (
        lambda d: _relabel(d, "optim/", "F32", "BOOL", lambda s: [*s[:-1], s[-1] * 4] if s else [4]),
        r"optimiser tensor 'optim/generator/\d+/\w+' has dtype BOOL; optimiser state is numeric", "tensors"),
    "optimiser state larger than any parameter": (
        lambda d: _retensor(d, lambda t: t.update({"optim/generator/0/exp_avg": torch.zeros(100_000)})),
        r"has 100000 elements, more than the largest network tensor", "tensors"),
    "optimiser state of an unlisted optimiser": (
        lambda d: _retensor(d, lambda t: t.update({"optim/critic/0/exp_avg": torch.zeros(3)})),
        r"tensor 'optim/critic/0/exp_avg' is not the state of an optimiser listed", "tensors"),
    "config that cannot be built": (
        lambda d: _edit_metadata(d, lambda m: m["networks"]["stage1"]["config"].update(widths=[2 ** 62, 8])),
        r"network 'stage1' \(rm2s_unet\) cannot be built from its recorded config: .*overflow", "tensors"),
    "truncated": (lambda d: d[: len(d) // 2], r"not a readable safetensors checkpoint: .*incomplete", "metadata"),
    "zero bytes": (lambda d: b"", r"not a readable safetensors checkpoint: .*too small", "metadata"),
    "a pickle renamed .safetensors": (lambda d: _pickle(), r"not a readable safetensors checkpoint", "metadata"),
    "safetensors header nested deeply": (
        lambda d: _join({"__metadata__": {}, "x": json.loads(_nested(200))}, b""),
        r"not a readable safetensors checkpoint: .*recursion", "metadata"),
    "safetensors without our metadata": (
        lambda d: save_bytes({"stage1/w": torch.zeros(2)}), r"not a dereflect checkpoint \(no metadata\)", "metadata"),
    "metadata not JSON": (lambda d: _metadata_text(d, "{'format': 1"), r"metadata is not valid JSON", "metadata"),
    "metadata a JSON list": (lambda d: _metadata_text(d, "[1, 2]"), r"must be a JSON object, got list", "metadata"),
    "metadata nested past the parser": (
        lambda d: _metadata_text(d, '{"format": "dereflect-checkpoint", "x": ' + _nested(100_000) + "}"),
        rf"metadata nests deeper than {MAX_METADATA_DEPTH} levels", "metadata"),
    "metadata nested past the limit": (
        lambda d: _edit_metadata(d, lambda m: m.update(x=json.loads(_nested(MAX_METADATA_DEPTH + 5)))),
        rf"metadata nests deeper than {MAX_METADATA_DEPTH} levels", "metadata"),
    "metadata huge": (
        lambda d: _edit_metadata(d, lambda m: m.update(x="y" * MAX_METADATA_CHARS)),
        r"metadata is \d+ characters, more than", "metadata"),
    "another format": (
        lambda d: _edit_metadata(d, lambda m: m.update(format="other")), r"not a dereflect checkpoint", "metadata"),
    "format_version as text": (
        lambda d: _edit_metadata(d, lambda m: m.update(format_version="1")),
        r"format_version must be a whole number >= 1, got '1'", "metadata"),
    "format_version from the future": (
        lambda d: _edit_metadata(d, lambda m: m.update(format_version=2)), r"format 2 is newer", "metadata"),
    "step missing": (
        lambda d: _edit_metadata(d, lambda m: m.pop("step")), r"metadata lacks 'step'", "metadata"),
    "step negative": (
        lambda d: _edit_metadata(d, lambda m: m.update(step=-1)), r"step must be a whole number >= 0", "metadata"),
    "kind not text": (
        lambda d: _edit_metadata(d, lambda m: m.update(kind=2)), r"kind must be a non-empty string, got 2", "metadata"),
    "networks a list": (
        lambda d: _edit_metadata(d, lambda m: m.update(networks=["stage1"])), r"networks must be an object",
        "metadata"),
    "network named optim": (
        lambda d: _edit_metadata(d, lambda m: m["networks"].update(optim=m["networks"]["stage1"])),
        r"network name 'optim' is not usable", "metadata"),
    "unknown architecture": (
        lambda d: _edit_metadata(d, lambda m: m["networks"]["stage1"].update(arch="resnet")),
        r"network 'stage1' has unknown architecture 'resnet'; known: rm2s_unet", "metadata"),
    "config value of the wrong type": (
        lambda d: _edit_metadata(d, lambda m: m["networks"]["stage1"]["config"].update(in_channels="3")),
        r"network 'stage1' \(rm2s_unet\): config in_channels must be a whole number, got '3'", "metadata"),
    "config list of text": (
        lambda d: _edit_metadata(d, lambda m: m["networks"]["generator"]["config"].update(widths=["4", "8"])),
        r"config widths must be a list of at most \d+ whole numbers", "metadata"),
    "config key unknown": (
        lambda d: _edit_metadata(d, lambda m: m["networks"]["stage1"]["config"].update(depth=3)),
        r"config not accepted: .*unknown key\(s\) \['depth'\]", "metadata"),
    "config refused by its class": (
        lambda d: _edit_metadata(d, lambda m: m["networks"]["stage1"]["config"].update(widths=[-4, 8])),
        r"config not accepted: .*widths must be positive", "metadata"),
    "optimiser metadata malformed": (
        lambda d: _edit_metadata(d, lambda m: m["optimizers"]["generator"].update(param_groups={})),
        r"optimiser 'generator' must be an object with 'state'", "metadata"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_are_refused_with_a_one_line_model_error(base, tmp_path, case):
    make, pattern, stage = BROKEN[case]
    path = tmp_path / "case.safetensors"
    path.write_bytes(make(base["bytes"]))
    before = _tree(tmp_path)
    message = _load_refused(path)
    assert re.search(pattern, message), message
    if stage == "metadata":
        with pytest.raises(ModelError, match=re.escape(message)):
            read_metadata(path)
    else:
        read_metadata(path)  # the metadata alone is fine: the tensors are what is wrong
    assert _tree(tmp_path) == before


def test_the_relabelled_checkpoint_opens_as_a_model_only_to_be_refused(base, tmp_path):
    """The bug this corpus started from: int32 bits read as weights must never reach a network."""
    from dereflect.models import open_model

    path = tmp_path / "relabelled.safetensors"
    path.write_bytes(BROKEN["float32 relabelled int32"][0](base["bytes"]))
    with pytest.raises(ModelError, match="wrong dtype"):
        open_model(path, device="cpu")


# --- engine sidecars --------------------------------------------------------------------------------


def _sidecar() -> Dict[str, Any]:
    return EngineInfo(network="stage1", engine="stage1.engine", onnx="stage1.onnx", onnx_sha256="a" * 64,
                      tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16",
                      profiles={"image": derive_profile(3)}, strongly_typed=False, float32_layers=2,
                      engine_sha256="b" * 64).to_dict()


def _changed(**changes: Any) -> bytes:
    return json.dumps({**_sidecar(), **changes}).encode()


def _profile(**bounds: Any) -> bytes:
    return _changed(profiles={"image": {**derive_profile(3), **bounds}})


SIDECARS: Dict[str, Tuple[bytes, str]] = {
    "profile bound of three numbers": (_profile(min=[1, 3, 128]), r"field profiles\['image'\]\['min'\] must be 4"),
    "profile bound with a bool": (_profile(opt=[True, 3, 720, 1280]), r"\['opt'\] must be 4 whole numbers >= 1"),
    "profile bound as text": (_profile(max="1x3x1080x1920"), r"\['max'\] must be 4 whole numbers"),
    "profile min above max": (_profile(min=[1, 3, 4000, 4000]), r"profiles\['image'\] must satisfy min <= opt <= max"),
    "profile without opt": (_changed(profiles={"image": {"min": [1, 3, 8, 8], "max": [1, 3, 8, 8]}}),
                            r"profiles\['image'\] must be an object with exactly min, opt and max"),
    "profiles a list": (_changed(profiles=[[1, 3, 8, 8]]), r"field 'profiles' must be an object"),
    "float32_layers as text": (_changed(float32_layers="2"), r"field 'float32_layers' must be a whole number >= 0"),
    "strongly_typed as text": (_changed(strongly_typed="yes"), r"field 'strongly_typed' must be true or false"),
    "gpu_name a number": (_changed(gpu_name=87), r"field 'gpu_name' must be a string, got 87"),
    "engine name with a folder": (_changed(engine="../stage1.engine"),
                                  r"field 'engine' must be a file name without a folder"),
    "precision unknown": (_changed(precision="int8"), r"field 'precision' must be fp16 or fp32, got 'int8'"),
    "onnx_sha256 not a hash": (_changed(onnx_sha256="abc"), r"field 'onnx_sha256' must be a SHA-256"),
    "format_version as text": (_changed(format_version="1"), r"field 'format_version' must be a whole number"),
    "field missing": (json.dumps({k: v for k, v in _sidecar().items() if k != "onnx"}).encode(),
                      r"engine sidecar lacks onnx"),
    "a JSON list": (b"[1, 2, 3]", r"not a dereflect engine sidecar"),
    "nested past the parser": (_nested(100_000).encode(), r"not a valid engine sidecar: its JSON nests too deeply"),
    "huge": (b" " * MAX_SIDECAR_BYTES + b"{}", rf"not a valid engine sidecar: larger than {MAX_SIDECAR_BYTES} bytes"),
    "binary": (bytes(range(256)), r"not a valid engine sidecar"),
    "empty": (b"", r"not a valid engine sidecar"),
}


def test_a_valid_sidecar_reads_back_with_its_fields(tmp_path):
    path = tmp_path / "stage1.engine.json"
    path.write_bytes(json.dumps({**_sidecar(), "added_by_a_newer_writer": 1}).encode())
    info = read_engine_info(path)
    assert info.profiles == {"image": derive_profile(3)} and info.float32_layers == 2 and info.engine_sha256 == "b" * 64


@pytest.mark.parametrize("case", list(SIDECARS))
def test_broken_sidecars_are_refused_naming_the_field(tmp_path, case):
    content, pattern = SIDECARS[case]
    path = tmp_path / "stage1.engine.json"
    path.write_bytes(content)
    with pytest.raises(ModelError) as caught:
        read_engine_info(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and re.search(pattern, message), message
    assert path.read_bytes() == content


# --- through the command line -----------------------------------------------------------------------


@pytest.fixture
def pairs(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "pairs"
    for folder in ("blended", "transmission_layer"):
        (root / folder).mkdir(parents=True)
        cv2.imwrite(str(root / folder / "a.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("case", ["float32 relabelled int32", "config value of the wrong type", "truncated"])
@pytest.mark.parametrize("command", ["eval", "export onnx"])
def test_the_cli_refuses_a_broken_checkpoint_in_one_line_and_writes_nothing(base, tmp_path, pairs, capsys, case,
                                                                            command):
    make, pattern, _ = BROKEN[case]
    checkpoint = tmp_path / "broken.safetensors"
    checkpoint.write_bytes(make(base["bytes"]))
    out = tmp_path / "out"
    before = _tree(tmp_path)
    if command == "eval":
        argv = ["eval", str(checkpoint), "--data", str(pairs), "--out", str(out), "--no-progress"]
    else:
        argv = ["export", "onnx", str(checkpoint), "-o", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("dereflect: error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(pattern, captured.err) and "Traceback" not in captured.err + captured.out, captured.err
    assert _tree(tmp_path) == before and not out.exists()
