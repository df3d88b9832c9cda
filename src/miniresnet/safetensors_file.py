"""The safetensors format, read and written with torch alone, so that loading a model (a shipped
one, through torch.hub too) needs nothing beyond torch.

A file is: 8 bytes (little-endian u64) giving the header's length, the header (JSON: for each
tensor its dtype, shape and byte range in the data, plus a "__metadata__" table of strings), then
the tensors' bytes, little-endian, one after the other. Nothing in it is code, so reading a file
from anywhere is safe. The tests check both directions against the `safetensors` package.

Reading checks the header as strictly as the reference package does before any data is read: the
tensors' byte ranges must cover the data exactly, without gaps or overlaps, so reading a file costs
its data once plus its parsed header, however the header is crafted.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import MiniResNetError
from .files import atomic_path

DTYPES = {
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
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 16 * 2**20  # a model's header is a few KB plus its class names; parsing costs ~10x it in memory
MAX_TENSORS = 10_000  # the largest MiniResNet that checkpoint.py's bounds allow has ~1,600
MAX_ELEMENTS = 2**63  # PyTorch's sizes and strides are int64


class Entry(NamedTuple):
    """Where one tensor is in the file: `begin` and `end` are byte offsets into the data."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


def looks_like_safetensors(path: str | Path) -> bool:
    """True when the file starts as a safetensors file does (a length, then a JSON object)."""
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:9] == b"{"


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> None:
    """Write `tensors` (any of the DTYPES) and the string `metadata` to `path`, atomically."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does it
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for raw in chunks:
                f.write(raw)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; anything malformed is a MiniResNetError. The
    header is checked before the data is read; the data is read once, into one buffer, and the
    tensors are views of it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_size = header_size_of(f.read(8), file_size)
            header = parse_header(f.read(header_size))
            metadata = checked_metadata(header.pop("__metadata__", None))
            data_size = file_size - 8 - header_size
            entries = checked_entries(header, data_size)
            data = bytearray(data_size)
            if f.readinto(data) != data_size:
                raise ValueError("the file became shorter while it was read")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        raise MiniResNetError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from None
    return {entry.name: tensor_in(data, entry) for entry in entries}, metadata


def header_size_of(start: bytes, file_size: int) -> int:
    """The header's size in bytes, from the file's first 8 bytes."""
    if len(start) < 8:
        raise ValueError(f"the file has {file_size} bytes, fewer than the 8 that give its header's size")
    (size,) = struct.unpack("<Q", start)
    if size > min(MAX_HEADER_BYTES, file_size - 8):
        raise ValueError(
            f"the header claims {size:,} bytes; the file has {file_size:,}, and headers over {MAX_HEADER_BYTES:,} "
            "are not read"
        )
    return size


def parse_header(raw: bytes) -> dict:
    """The header's JSON object, read as the reference reads it: UTF-8, and no NaN or Infinity."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except RecursionError:
        raise ValueError("the header's JSON nests too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {json_type(header)}, not an object")
    return header


def refuse_constant(name: str) -> None:
    raise ValueError(f"the header holds {name}, which JSON does not allow")


def checked_metadata(metadata: object) -> dict[str, str]:
    """The `__metadata__` table: strings to strings (a missing or null one is empty)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"__metadata__ is a JSON {json_type(metadata)}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ValueError(f"__metadata__ {key!r} is a JSON {json_type(value)}, not a string")
    return metadata


def checked_entries(header: dict, data_size: int) -> list[Entry]:
    """The tensors' entries, each well formed, in data order, covering the `data_size` bytes exactly."""
    if len(header) > MAX_TENSORS:
        raise ValueError(f"the header lists {len(header):,} tensors; at most {MAX_TENSORS:,} are read")
    entries = sorted((checked_entry(name, entry) for name, entry in header.items()), key=lambda e: (e.begin, e.end))
    covered = 0
    for entry in entries:
        if entry.begin != covered:  # each data byte belongs to exactly one tensor: no overlaps, no gaps
            raise ValueError(
                f"tensor {entry.name!r} starts at data byte {entry.begin:,} where the tensors before it end at "
                f"{covered:,}; tensors may not overlap or leave gaps"
            )
        covered = entry.end
    if covered != data_size:
        raise ValueError(f"the tensors cover {covered:,} of the {data_size:,} data bytes")
    return entries


def checked_entry(name: str, entry: object) -> Entry:
    """One tensor's entry: a known dtype, a shape of whole numbers, and as many bytes as they need."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r} is a JSON {json_type(entry)}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor {name!r} has the dtype {dtype!r}; known dtypes: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(is_count(n) for n in shape):
        raise ValueError(f"tensor {name!r} has the shape {shape!r}, not a list of whole numbers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(n) for n in offsets)):
        raise ValueError(f"tensor {name!r} has the data_offsets {offsets!r}, not two whole numbers >= 0")
    elements = 1
    for n in shape:  # one factor at a time, so a hostile shape stops here instead of making a huge number
        elements *= max(n, 1)  # a size of 0 still takes part in the strides
        if elements >= MAX_ELEMENTS:
            raise ValueError(f"tensor {name!r} has the shape {shape!r}, too large for PyTorch")
    size = math.prod(shape) * DTYPES[dtype].itemsize
    begin, end = offsets
    if end - begin != size:
        raise ValueError(
            f"tensor {name!r} ({dtype} {shape}) needs {size:,} bytes but has data bytes {begin:,} to {end:,}"
        )
    return Entry(name, DTYPES[dtype], shape, begin, end)


def tensor_in(data: bytearray, entry: Entry) -> torch.Tensor:
    """The entry's tensor: a view of `data`, or a copy where its bytes are not aligned for its dtype
    (the format does not align them; the tensors PyTorch allocates always are)."""
    if entry.begin == entry.end:  # frombuffer refuses an empty buffer
        return torch.empty(entry.shape, dtype=entry.dtype)
    count = (entry.end - entry.begin) // entry.dtype.itemsize
    tensor = torch.frombuffer(data, dtype=entry.dtype, count=count, offset=entry.begin).reshape(entry.shape)
    return tensor if tensor.data_ptr() % entry.dtype.itemsize == 0 else tensor.clone()


def is_count(value: object) -> bool:
    """A JSON whole number >= 0 (Python's bool is an int, JSON's true is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def json_type(value: object) -> str:
    """What a parsed JSON value is, in JSON's words."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "null")
