"""The safetensors format, read and written with torch alone, so that loading a model (a shipped
one, through torch.hub too) needs nothing beyond torch.

A file is: 8 bytes (little-endian u64) giving the header's length, the header (JSON: for each
tensor its dtype, shape and byte range in the data, plus a "__metadata__" table of strings), then
the tensors' bytes, little-endian, one after the other. Nothing in it is code, so reading a file
from anywhere is safe. The tests check both directions against the `safetensors` package.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

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
MAX_HEADER_BYTES = 100_000_000  # the format's own limit


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
    """(tensors, metadata) of a safetensors file; anything malformed is a MiniResNetError."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        if length > min(MAX_HEADER_BYTES, len(raw) - 8):
            raise ValueError(f"the header claims {length:,} bytes; the file has {len(raw):,}")
        header = json.loads(raw[8 : 8 + length])
        metadata = header.pop("__metadata__", None) or {}
        data = memoryview(raw)[8 + length :]
        tensors = {}
        for name, entry in header.items():
            dtype = DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= len(data) or end - begin != size:
                raise ValueError(f"tensor {name!r} has bytes {begin}-{end} for {size} of a {len(data)}-byte buffer")
            if size == 0:  # frombuffer refuses an empty buffer
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise MiniResNetError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from None
    return tensors, metadata
