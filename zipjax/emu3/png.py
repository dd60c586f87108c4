"""A minimal PNG writer (8-bit RGB, no filtering) so that saving an image needs no imaging library."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from zipjax.errors import ZipjaxError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [height, width, 3] -> PNG file bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ZipjaxError(f"a PNG needs a uint8 [height, width, 3] image, got {image.dtype} {image.shape}")
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise ZipjaxError(f"cannot write {path}: the folder {path.parent} does not exist")
    path.write_bytes(encode_png(image))
    return path


def read_png(path: str | Path) -> np.ndarray:
    """Read back an 8-bit RGB or RGBA PNG with no interlacing (what `write_png` and most tools write)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ZipjaxError(f"{path} is not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if header is None:
        raise ZipjaxError(f"{path} has no PNG header")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ZipjaxError(f"{path}: only 8-bit RGB/RGBA non-interlaced PNGs are supported")
    channels = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    out = np.zeros((height, width * channels), np.int32)
    prev = np.zeros(width * channels, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind in (0, 1, 2):  # none, sub, up: vectorised
            if kind == 1:
                line = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1)
            cur = (line + (prev if kind == 2 else 0)) & 0xFF
            out[y], prev = cur, cur
            continue
        cur = np.zeros_like(line)
        for x in range(line.size):
            left = cur[x - channels] if x >= channels else 0
            up, up_left = prev[x], prev[x - channels] if x >= channels else 0
            if kind == 3:
                pred = (left + up) // 2
            else:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
            cur[x] = (line[x] + pred) & 0xFF
        out[y], prev = cur, cur
    return out.reshape(height, width, channels)[..., :3].astype(np.uint8)
