"""Still images through an image decoder (Pillow), not the video demuxer.

PyAV's seeking read path fails on many real JPEGs (`End of file: 'avcodec_send_packet()'`), and
most image-text corpora are JPEG. `read_image` decodes what such corpora hold: JPEG (baseline,
progressive, CMYK / Adobe inverted CMYK), PNG (8/16-bit, palette, alpha, grayscale), WebP,
GIF (first frame), BMP/TIFF, with the EXIF orientation applied, as (H, W, 3) uint8 RGB.
Alpha is dropped, as `Image.convert("RGB")` in the official loaders does.
"""

from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np

from internvideo2_jax.data.video import Source, VideoReadError, check_file


def read_image(src: Source, name: Optional[str] = None) -> np.ndarray:
  """(H, W, 3) uint8 RGB of an image file or its bytes; VideoReadError (with a skip reason)
  names the file when it cannot be read."""
  from PIL import Image, ImageOps, UnidentifiedImageError
  name = name or (os.fspath(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>")
  check_file(src)
  try:
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)) as img:
      img.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
      img = ImageOps.exif_transpose(img)
      return _to_rgb8(img)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
    raise VideoReadError(f"{name}: cannot decode image: {type(e).__name__}: {e}", "corrupt_video") from e


def _to_rgb8(img) -> np.ndarray:
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
    a = np.asarray(img).astype(np.int64)
    peak = 65535 if img.mode.startswith("I;16") or a.max() > 255 else 255
    g = np.clip(a * 255 // peak, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
  if img.mode == "F":
    g = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
  out = np.asarray(img.convert("RGB"))  # L, P, RGBA (alpha dropped), CMYK, YCbCr, RGB, 1
  if out.dtype != np.uint8:
    out = out.astype(np.uint8)
  return np.ascontiguousarray(out)
