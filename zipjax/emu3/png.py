"""Image files, read and written with Pillow (a well-kept library, so formats, filters and interlacing are its
problem, and so are malicious files).

Reading checks the size an image *declares* before decoding any pixel data: a small file that claims to be a huge
image (a decompression bomb) is refused by name instead of allocating gigabytes. Every way a file can fail to be an
image (not an image, truncated, corrupt, unsupported) is a ZipjaxError naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zipjax.errors import ZipjaxError

MAX_IMAGE_PIXELS = 64 << 20  # 67 megapixels; models resize to about one megapixel, larger inputs are not photos


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


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """uint8 [height, width, 3] from any image file Pillow reads (RGB; alpha and palettes converted)."""
    path = Path(path)
    if not path.is_file():
        raise ZipjaxError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
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
