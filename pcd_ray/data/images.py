"""Decoding image bytes safely, and turning a batch of them into model input.

Every stage that reads images (train, eval, embed, serve) goes through :func:`decode_image`, so a corrupt file,
an image bomb or an unsupported mode is one clear ``ImageDecodeError`` everywhere, never a crash deep in PIL.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable, Sequence

DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image, or an image over the pixel limit."""


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """PNG/JPEG/... bytes -> RGB PIL image. Raises ImageDecodeError with the reason."""
    from PIL import Image

    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # Check the header's size before decoding pixels: a bomb is rejected without allocating it.
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageDecodeError(f"image is {img.width}x{img.height}, over the limit of {max_pixels} pixels")
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"image too large: {e}") from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageDecodeError(f"not a decodable image: {type(e).__name__}: {e}") from None
    return img.convert("RGB")


def encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def preprocess_batch(images: Sequence[bytes], preprocess: Callable, *, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Bytes -> float tensor [n, 3, H, W] through open_clip's transform. Raises ImageDecodeError naming the index."""
    import torch

    out = []
    for i, data in enumerate(images):
        try:
            out.append(preprocess(decode_image(bytes(data), max_pixels=max_pixels)))
        except ImageDecodeError as e:
            raise ImageDecodeError(f"image {i}: {e}") from None
    return torch.stack(out)
