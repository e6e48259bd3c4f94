"""The draft path's JPEG decoder when the optional ``simplejpeg`` package is installed (extra
``fast-decode``): libjpeg-turbo's own API, which scales in the DCT domain as Pillow's ``draft``
does and gives the same pixels (tests/test_decode_paths.py), without Pillow's Python-side
loading and its 4-byte image, and with the interpreter lock released while it decodes.
Without the package, or for a JPEG it does not take (not YCbCr or RGB, EXIF-rotated, one it
refuses), Pillow decodes as before, with its own error messages.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image

try:
    import simplejpeg
except ImportError:  # the fast-decode extra is not installed
    simplejpeg = None

ROTATED = range(2, 9)  # EXIF orientations that ImageOps.exif_transpose turns upright


def available() -> bool:
    return simplejpeg is not None


def decode_drafted(img: Image.Image) -> np.ndarray | None:
    """uint8 [H, W, 3] of ``img``, a JPEG that Pillow has opened and ``draft``-ed, at the size
    Pillow would decode it to; None where Pillow must decode it (see the module docstring)."""
    if simplejpeg is None or img.format != "JPEG" or img.mode != "RGB":
        return None
    width, height = img.size
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) in ROTATED:
            return None
        img.fp.seek(0)
        rgb = simplejpeg.decode_jpeg(img.fp.read(), "RGB", min_height=height,
                                     min_width=width, min_factor=2)
    except Exception:  # any refusal: Pillow decides, and words the error
        return None
    return rgb if rgb.shape == (height, width, 3) else None
