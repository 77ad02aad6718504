"""A generated corpus of broken, hostile and unusual inputs, each with the outcome it must have.

Each case builds its input file in a folder and names the outcome: None means the conversion must
succeed; a regular expression means it must fail with a QuantError whose message matches it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

NOT_SAFETENSORS = r"not a (valid )?safetensors file"
PICKLE = r"a PyTorch pickle checkpoint must be exported to safetensors first"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    error: str | None  # regex of the expected QuantError message, None when it must succeed
    options: dict = field(default_factory=dict)


def _raw(content: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "input.safetensors"
        path.write_bytes(content)
        return path

    return build


def _header(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = json.dumps(header).encode() if raw is None else raw
    return struct.pack("<Q", len(text)) + text + data


def _tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "input.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path

    return build


def _truncated(folder: Path) -> Path:
    path = _tensors({"a.weight": torch.ones(64, 64)})(folder)
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _torch_saved(zip_archive: bool) -> Callable[[Path], Path]:
    """A PyTorch checkpoint (torch.save's zip archive, or the older bare pickle) under a safetensors name."""

    def build(folder: Path) -> Path:
        path = folder / "input.safetensors"
        torch.save({"state_dict": {"a.weight": torch.ones(2, 2)}}, path, _use_new_zipfile_serialization=zip_archive)
        return path

    return build


def _w(*shape: int, value: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape) + 1)
    if value is not None:
        return torch.full(shape, value, dtype=dtype)
    return (torch.randn(*shape, generator=g) * 0.05).to(dtype)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
LINEAR = {"linear.weight": _w(4, 4)}
NOTHING = r"input\.safetensors: no weight would be quantized, so nothing was written \("

CASES: list[Case] = [
    Case("text-file", _raw(b"this is not a model, just text" * 3), NOT_SAFETENSORS),
    Case("empty-file", _raw(b""), NOT_SAFETENSORS),
    Case("truncated-header", _raw(struct.pack("<Q", 200) + b'{"a": {"dtype"'), NOT_SAFETENSORS),
    Case("header-length-beyond-file", _raw(struct.pack("<Q", 10**12) + b"{}"), NOT_SAFETENSORS),
    Case("header-not-json", _raw(_header(None, raw=b"{nope}")), NOT_SAFETENSORS),
    Case("header-not-object", _raw(_header([1, 2, 3])), NOT_SAFETENSORS),
    Case("offsets-out-of-range", _raw(_header({"a.weight": F32}, b"\0" * 4)), NOT_SAFETENSORS),
    Case(
        "offsets-overlap",
        _raw(_header({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12)),
        NOT_SAFETENSORS,
    ),
    Case("size-not-matching-shape", _raw(_header({"a": {**F32, "shape": [3]}}, b"\0" * 8)), NOT_SAFETENSORS),
    Case(
        "duplicate-names",
        _raw(
            _header(
                None,
                b"\0" * 8,
                raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
            )
        ),
        r"appears twice|not a valid safetensors file",
    ),
    Case("unknown-dtype", _raw(_header({"a": {**F32, "dtype": "Q7"}}, b"\0" * 8)), NOT_SAFETENSORS),
    Case("truncated-data", _truncated, NOT_SAFETENSORS),
    Case("pytorch-zip-checkpoint", _torch_saved(zip_archive=True), NOT_SAFETENSORS + ".*" + PICKLE),
    Case("pytorch-bare-pickle", _torch_saved(zip_archive=False), NOT_SAFETENSORS + ".*" + PICKLE),
    Case(
        "nan-in-weight",
        _tensors({"bad.weight": _w(4, 4).index_fill(0, torch.tensor([1]), float("nan"))}),
        r"'bad\.weight'.*NaN|'bad\.weight'.*nan",
    ),
    Case(
        "inf-in-weight",
        _tensors({"bad.weight": _w(4, 4).index_fill(1, torch.tensor([2]), float("inf"))}),
        r"'bad\.weight'.*--exclude",
    ),
    Case(
        "fp64-beyond-float32-scales",
        _tensors({"huge.weight": _w(3, 3, value=1e300, dtype=torch.float64)}),
        r"'huge\.weight'.*cannot be scaled",
    ),
    Case(
        "already-scaled-fp16",
        _tensors(
            {
                "a.weight": _w(2, 2, dtype=torch.float16),
                "a.scale_weight": torch.ones(1),
                "scaled_fp16": torch.zeros(2, dtype=torch.float16),
            }
        ),
        r"already a scaled model.*scaled_fp16",
    ),
    Case(
        "already-scaled-fp8-marker",
        _tensors({"a.weight": _w(2, 2), "scaled_fp8": torch.zeros(2)}),
        r"already a scaled model.*scaled_fp8",
    ),
    Case("all-zero-weight", _tensors({"z.weight": torch.zeros(8, 8)}), None),
    Case("denormal-only-weight", _tensors({"d.weight": torch.full((4, 4), 1e-42)}), None),
    Case("beyond-fp16-range", _tensors({"big.weight": _w(8, 8) * 1e37}), None),
    # unusual tensors beside one ordinary weight: handled, and the weight quantized
    Case("zero-dim-weight", _tensors({"s.weight": torch.tensor(0.5), **LINEAR}), None),
    Case("one-dim-weight", _tensors({"n.weight": _w(16), **LINEAR}), None),
    Case("three-dim-weight", _tensors({"t.weight": _w(2, 3, 4), **LINEAR}), None),
    Case("conv-weight", _tensors({"conv.weight": _w(8, 4, 3, 3), **LINEAR}), None),
    Case("zero-size-weight", _tensors({"e.weight": torch.zeros(0, 16), **LINEAR}), None),
    Case(
        "integer-and-bool",
        _tensors(
            {
                "i.weight": torch.arange(12, dtype=torch.int32).reshape(3, 4),
                "b": torch.tensor([True, False]),
                "u": torch.arange(4, dtype=torch.uint8),
                **LINEAR,
            }
        ),
        None,
    ),
    Case(
        "fp8-tensors",
        _tensors({"f.weight": _w(4, 4).to(torch.float8_e4m3fn), "g.weight": _w(4, 4).to(torch.float8_e5m2), **LINEAR}),
        None,
    ),
    Case("very-long-name", _tensors({("layer." * 170) + "weight": _w(4, 4)}), None),
    Case("non-ascii-names", _tensors({"блок.0.注意.weight": _w(4, 4), "ñ.bias": _w(4)}), None),
    Case(
        "bf16-and-fp16-mix",
        _tensors({"a.weight": _w(8, 8, dtype=torch.bfloat16), "b.weight": _w(8, 8, dtype=torch.float16)}),
        None,
    ),
    # inputs that would yield nothing useful (no weight quantized): refused, saying why
    Case("only-metadata", _tensors({}, metadata={"note": "empty model"}), NOTHING + r"the file holds no tensors\)$"),
    Case(
        "fp8-only",
        _tensors({"f.weight": _w(4, 4).to(torch.float8_e4m3fn), "g.weight": _w(4, 4).to(torch.float8_e5m2)}),
        NOTHING + r"2 weights in float8: convert the original bf16/fp16/fp32 file\)$",
    ),
    Case(
        "no-linear-weight",
        _tensors({"n.weight": _w(16), "conv.weight": _w(8, 4, 3, 3), "e.weight": torch.zeros(0, 16)}),
        NOTHING + r"none of its 3 tensors is a 2-D '\.weight'",
    ),
]
