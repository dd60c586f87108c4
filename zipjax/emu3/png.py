"""Image files, read and written with Pillow (a well-kept library, so formats, filters and interlacing are its
problem, and so are malicious files).

Reading checks the size an image *declares* before decoding any pixel data: a small file that claims to be a huge
image (a decompression bomb) is refused by name instead of allocating gigabytes; only a regular file of bounded
size is opened (a folder, a pipe or a device is named as such). Every way a file can fail to be an
image (not an image, truncated, corrupt, unsupported) is a ZipjaxError naming the file.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zipjax.errors import ZipjaxError

MAX_IMAGE_PIXELS = 64 << 20  # 67 megapixels; models resize to about one megapixel, larger inputs are not photos
MAX_IMAGE_BYTES = 1 << 30  # a 67-megapixel image, uncompressed RGBA 16-bit, is about half of this


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [height, width, 3] -> PNG file bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ZipjaxError(f"a PNG needs a uint8 [height, width, 3] image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def check_writable(path: str | Path) -> Path:
    """Raise now, not after minutes of generation, if a PNG cannot be written at `path`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ZipjaxError(f"the output must name a .png file, got {path}")
    if path.is_dir():
        raise ZipjaxError(f"cannot write {path}: it is a folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ZipjaxError(f"cannot write {path}: the folder {parent} does not exist")
    if not (path.exists() and _writable(path)) and not _writable(parent):
        raise ZipjaxError(f"cannot write {path}: permission denied")
    return path


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = check_writable(path)
    path.write_bytes(encode_png(image))
    return path


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """uint8 [height, width, 3] from any image file Pillow reads (RGB; alpha and palettes converted). Only a regular
    file of at most `max_bytes` is read: a folder, a pipe (which would block) or a device (/dev/zero never ends) is
    refused by name before anything is read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opened without O_NONBLOCK waits for a writer
    except FileNotFoundError:
        raise ZipjaxError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise ZipjaxError(f"{path} is a folder, not an image") from None
    except OSError as e:
        raise ZipjaxError(f"cannot read the image {path}: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ZipjaxError(f"{path} is a folder, not an image")
        kind = "a pipe" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or \
            stat.S_ISBLK(info.st_mode) else "not a regular file"
        raise ZipjaxError(f"{path} is {kind}, not an image file; zipjax reads images from regular files")
    with os.fdopen(fd, "rb") as file:
        if info.st_size > max_bytes:
            raise ZipjaxError(f"{path} holds {info.st_size:,} bytes, more than the {max_bytes:,} an image zipjax "
                              "reads may")
        return _decode(file, path, max_pixels)


def _decode(file, path: Path, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:  # reads the header only
                width, height = image.size
                if width * height > max_pixels:
                    raise ZipjaxError(f"{path} declares a {width}x{height} image ({width * height:,} pixels), more "
                                      f"than the {max_pixels:,} zipjax reads; resize it first")
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's own header check
        raise ZipjaxError(f"{path} declares more than the {max_pixels:,} pixels zipjax reads: {e}") from None
    except UnidentifiedImageError as e:
        raise ZipjaxError(f"{path} is not an image zipjax can read: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for truncated or corrupt data
        raise ZipjaxError(f"{path} is a damaged image: {e}") from None
