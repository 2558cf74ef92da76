"""Decoding an uploaded PNG or JPEG into the uint8 tensor a vision model takes.

The REST bridge's ``POST /v2/models/{name}/infer/image`` hands the uploaded bytes here and
sends the result as one batch row: shape ``[1, height, width, 3]``, RGB, uint8. Pillow is
imported lazily so a bridge that never receives an image never loads it.
"""

from __future__ import annotations

import io

import numpy as np

from bridges.errors import RequestError
from inferoxy.protocol import ErrorCode

# Formats accepted; others (GIF, TIFF, ...) are refused rather than decoded by whatever Pillow has.
FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """The image as a ``[1, H, W, 3]`` uint8 RGB array; RequestError (``bad_input``) for anything else.

    ``max_pixels`` is checked against the header's size before any pixel is decoded, so a small
    file claiming a huge image (a decompression bomb) costs nothing.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(ErrorCode.BAD_INPUT, "the request has no image: send a PNG or JPEG as the body")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    ErrorCode.BAD_INPUT, f"the image is {width}x{height}, more than the limit of {max_pixels} pixels"
                )
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(ErrorCode.BAD_INPUT, "the body is not a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated or corrupt files
        raise RequestError(ErrorCode.BAD_INPUT, f"the image cannot be decoded: {exc}") from None
    return rgb[np.newaxis]
