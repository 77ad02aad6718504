"""Lazy safetensors reading (memory-mapped, zero-copy) and an atomic, streaming safetensors writer.

The reader lets the safetensors library validate the file, then maps it privately so tensors are
views of page-cache pages (reclaimable memory) rather than heap copies. The writer lays out the
whole file up front (names, dtypes, shapes are known before any work), so each tensor can be
written the moment it is ready, and the file only appears under its final name when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import mmap
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import QuantError
from .staging import StagedFile

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
# The safetensors library's own data order (widest types first), so streamed files are byte-identical.
_DTYPE_ORDER = (
    "U64",
    "I64",
    "F64",
    "C64",
    "F32",
    "U32",
    "I32",
    "BF16",
    "F16",
    "U16",
    "I16",
    "F8_E8M0",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "F6_E3M2",
    "F6_E2M3",
    "F4",
    "BOOL",
)
_HEADER_SIZE_BYTES = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return TORCH_DTYPES.get(self.dtype)


class _DuplicateName(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateName(key)
        seen[key] = value
    return seen


def _not_safetensors(path: str | os.PathLike, why: str) -> QuantError:
    hint = f"; {PICKLE_HINT}" if looks_like_pickle(path) else ""
    return QuantError(f"{path}: not a safetensors file ({why}){hint}")


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return (header dict, data start offset) of a safetensors file, without reading tensor data."""
    with open(path, "rb") as fh:
        raw_len = fh.read(_HEADER_SIZE_BYTES)
        if len(raw_len) < _HEADER_SIZE_BYTES:
            raise _not_safetensors(path, "shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw_len)
        size = os.fstat(fh.fileno()).st_size
        if header_len > size - _HEADER_SIZE_BYTES:
            raise _not_safetensors(path, f"header length {header_len} exceeds file size {size}")
        try:
            header = json.loads(fh.read(header_len), object_pairs_hook=_refuse_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _not_safetensors(path, f"header is not JSON: {exc}") from None
        except _DuplicateName as dup:
            raise QuantError(f"{path}: tensor name '{dup}' appears twice in the header; the file is corrupt") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "header is not a JSON object")
    return header, _HEADER_SIZE_BYTES + header_len


_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PICKLE_HINT = (
    "a PyTorch pickle checkpoint must be exported to safetensors first, from a file you trust: "
    "python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('model.ckpt', "
    "map_location='cpu', weights_only=False); save_file(sd.get('state_dict', sd), 'model.safetensors')\""
)


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """A PyTorch checkpoint by its name, or by its first bytes: torch.save's zip archive, or a bare pickle
    (where a safetensors file has its header's '{')."""
    if Path(path).suffix.lower() in _PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_SIZE_BYTES + 1)
    except OSError:
        return False
    bare_pickle = len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    return head.startswith(b"PK\x03\x04") or (bare_pickle and head[_HEADER_SIZE_BYTES:] != b"{")


def require_input_file(path: Path) -> None:
    """QuantError unless `path` is an existing file (a folder gets its own message)."""
    if path.is_dir():
        raise QuantError(f"{path}: is a folder; give the .safetensors file to convert")
    if not path.is_file():
        raise QuantError(f"{path}: input file not found")


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, remedy: str = "re-download or re-export it") -> Iterator[Any]:
    """`safe_open` on the CPU, with whatever the library raises for a malformed file (several types) as a QuantError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except QuantError:
        raise
    except Exception as exc:  # noqa: BLE001  (the library raises several types for malformed files)
        hint = PICKLE_HINT if looks_like_pickle(path) else remedy
        raise QuantError(f"{path}: not a valid safetensors file ({exc}); {hint}") from None


class SafetensorsFile:
    """A validated, read-only, memory-mapped safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        require_input_file(self.path)
        with open_safetensors(self.path) as f:
            names = list(f.keys())
            self.metadata: dict[str, str] = dict(f.metadata() or {})
        header, data_start = read_header(self.path)
        self.entries: dict[str, TensorEntry] = {}
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            self.entries[name] = TensorEntry(name, info["dtype"], tuple(info["shape"]), data_start + begin, end - begin)
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        # ACCESS_COPY: a private mapping; the file can never be modified through it.
        self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of a tensor (its pages stay file-backed until touched by a copy)."""
        entry = self.entries[name]
        dtype = entry.torch_dtype
        if dtype is None:
            raise QuantError(f"{self.path}: tensor '{name}' has dtype {entry.dtype}, which cannot be converted")
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=entry.numel, offset=entry.start)
        return flat.view(entry.shape)

    def raw_bytes(self, name: str) -> memoryview:
        entry = self.entries[name]
        if entry.nbytes == 0:
            return memoryview(b"")
        return memoryview(self._map)[entry.start : entry.start + entry.nbytes]

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                log.debug("tensor views of %s still alive; mapping closes with them", self.path)
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output file, declared before any data is written."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def dtype_itemsize(dtype: str) -> int:
    torch_dtype = TORCH_DTYPES.get(dtype)
    return torch_dtype.itemsize if torch_dtype is not None else 1


def _dtype_rank(dtype: str) -> int:
    return _DTYPE_ORDER.index(dtype) if dtype in _DTYPE_ORDER else len(_DTYPE_ORDER)


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    n = dtype_itemsize(dtype)
    for d in shape:
        n *= d
    return n


def _tensor_bytes(t: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    """A zero-copy byte view of a CPU tensor, and the tensor that must outlive it."""
    flat = t.detach().contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(b""), flat
    return memoryview((ctypes.c_char * nbytes).from_address(flat.data_ptr())).cast("B"), flat


def _file_layout(
    tensors: Sequence[OutputTensor], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """The header (padded, without its length) of a file of these tensors, each one's (offset, size) in the
    data, and the data's size: in the safetensors library's own order, so files are byte-identical to its."""
    ordered = sorted(tensors, key=lambda t: (_dtype_rank(t.dtype), t.name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offsets[t.name] = (offset, t.nbytes)
        offset += t.nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return header_bytes + b" " * (-len(header_bytes) % 8), offsets, offset


def file_size(tensors: Sequence[OutputTensor], metadata: Mapping[str, str]) -> int:
    """The size in bytes of the safetensors file StreamingWriter writes for these tensors and metadata."""
    header_bytes, _, data_size = _file_layout(tensors, metadata)
    return _HEADER_SIZE_BYTES + len(header_bytes) + data_size


class StreamingWriter:
    """Writes a safetensors file whose header is fixed up front, tensor by tensor, atomically.

    Data is written into a hidden `StagedFile` beside the target; `commit` renames it into place (and
    refuses to replace an existing file unless `overwrite`). Leaving the context without commit,
    or with an exception, deletes the temporary file: an output is either complete or absent.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        tensors: Sequence[OutputTensor],
        metadata: Mapping[str, str],
        overwrite: bool = False,
    ):
        self.target = Path(target)
        self.overwrite = overwrite
        header_bytes, self._offsets, data_size = _file_layout(tensors, metadata)
        self._data_start = _HEADER_SIZE_BYTES + len(header_bytes)
        self._pending = set(self._offsets)
        self._staged: StagedFile | None = None
        try:
            self._staged = StagedFile(self.target.parent, self.target.name)
        except OSError as exc:
            raise self._write_error(exc) from None
        try:
            self._write_at(struct.pack("<Q", len(header_bytes)) + header_bytes, 0)
            try:
                os.ftruncate(self._staged.fd, self._data_start + data_size)
            except OSError as exc:
                raise self._write_error(exc) from None
        except BaseException:
            self.abort()
            raise

    def _write_error(self, exc: OSError) -> QuantError:
        return QuantError(
            f"{self.target}: cannot write the output ({exc.strerror or exc}); "
            "check that the folder is writable and has free space"
        )

    def _write_at(self, data: bytes | memoryview, position: int) -> None:
        try:
            self._staged.write_at(data, position)
        except OSError as exc:  # disk full, file size limit, I/O error
            raise self._write_error(exc) from None

    def write(self, name: str, data: torch.Tensor | memoryview | bytes) -> None:
        """Write one declared tensor's bytes (a CPU tensor of the declared dtype, or raw bytes)."""
        offset, nbytes = self._offsets[name]
        payload, _keep_alive = _tensor_bytes(data) if isinstance(data, torch.Tensor) else (memoryview(data), None)
        if payload.nbytes != nbytes:
            raise ValueError(f"tensor '{name}': {payload.nbytes} bytes given, {nbytes} declared")
        self._write_at(payload, self._data_start + offset)
        self._pending.discard(name)

    def _check_complete(self) -> None:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} declared tensors were never written, e.g. {min(self._pending)}")

    def finish(self) -> StagedFile:
        """The complete file, still hidden, for the caller to place (`commit` places it at the target)."""
        self._check_complete()
        staged, self._staged = self._staged, None  # handed over: nothing left here to remove
        return staged

    def commit(self) -> Path:
        self._check_complete()
        try:
            try:
                return self._staged.place(self.target, self.overwrite)
            except FileExistsError:
                raise QuantError(f"{self.target}: output already exists; pass --overwrite to replace it") from None
            except OSError as exc:
                raise self._write_error(exc) from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._staged is not None:
            self._staged.discard()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # nothing left to remove once committed: an error, a cancel, or a forgotten commit


def write_state_dict(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save a whole in-memory state dict atomically (like safetensors' save_file, without numpy)."""
    with _written_whole(tensors, Path(path), metadata, overwrite=True) as writer:
        return writer.commit()


def stage_state_dict(
    tensors: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    hint: str = "",
) -> StagedFile:
    """A whole in-memory state dict written into a hidden file in `folder`, for the caller to place where it chooses."""
    with _written_whole(tensors, Path(folder, hint or "state_dict"), metadata) as writer:
        return writer.finish()


def _written_whole(
    tensors: Mapping[str, torch.Tensor], target: Path, metadata: Mapping[str, str] | None, overwrite: bool = False
) -> StreamingWriter:
    declared = [
        OutputTensor(name, DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size())
        for name, t in tensors.items()
    ]
    writer = StreamingWriter(target, declared, metadata or {}, overwrite)
    try:
        for name, t in tensors.items():
            writer.write(name, t.cpu())
    except BaseException:
        writer.abort()
        raise
    return writer
