"""Decoding image bytes safely, and turning a batch of them into model input.

Every stage that reads images (train, eval, embed, serve) goes through :func:`decode_image`, so a corrupt file,
an image bomb or an unsupported mode is one clear ``ImageDecodeError`` everywhere, never a crash deep in PIL. The
error carries its reject code (``corrupt_image`` or ``image_too_large``), so the stages that turn bad images into
reject rows (data, embed) never read it from the message.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

from pcd_ray.sink import RejectError

DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageDecodeError(RejectError):
    """Bytes that are not a decodable image (reason ``corrupt_image``), or an image over the pixel limit
    (``image_too_large``). A ValueError; ``str()`` is the message."""

    def __init__(self, message: str, reason: str = "corrupt_image"):
        super().__init__(reason, message)

    def __reduce__(self):
        # Its own argument order, so the reason survives a trip through Ray (a task's error is pickled).
        return type(self), (self.detail, self.reason)


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
                raise ImageDecodeError(
                    f"image is {img.width}x{img.height}, over the limit of {max_pixels} pixels", "image_too_large"
                )
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"image too large: {e}", "image_too_large") from None
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
            raise ImageDecodeError(f"image {i}: {e}", e.reason) from None
    return torch.stack(out)
