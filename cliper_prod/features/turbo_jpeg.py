"""The draft path's JPEG decoder when the optional ``simplejpeg`` package is installed (extra
``fast-decode``): libjpeg-turbo's own API, which scales in the DCT domain as Pillow's ``draft``
does and gives the same pixels (tests/test_decode_paths.py), with the interpreter lock released
while it decodes. The file's header is read here, not by Pillow: its Python-side parsing of the
markers, its EXIF reading and its 4-byte image cost about as much as the resize after it.
Whatever this module does not take (not a YCbCr or RGB JPEG, an orientation to apply, a second
picture, no reduction, over the pixel limit, a header Pillow's parser would refuse as far as
this module checks it, anything libjpeg-turbo refuses) goes to Pillow, which decodes it as
before and words its errors.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # the fast-decode extra is not installed
    simplejpeg = None

SOI = b"\xff\xd8\xff"
EXIF = b"Exif\x00\x00"
TIFF = (b"II*\x00", b"MM\x00*")  # the TIFF header an EXIF block holds
XMP = b"http://ns.adobe.com/xap/1.0/\x00"
MPF = b"MPF\x00"  # a multi-picture file (Pillow opens it as MPO)
ORIENTATION = 0x0112
#: APPn blocks whose header Pillow's parser reads at open, and the bytes it needs there
PARSED_APP = {(0xE0, b"JFIF"): 14, (0xEE, b"Adobe"): 12}
MAX_BYTES = 64 << 20  # a larger file goes to Pillow, which reads only what it needs


def read_jpeg(source: Path | BinaryIO) -> bytes | None:
    """The whole file (or stream) when it starts as a JPEG and holds at most ``MAX_BYTES``;
    None otherwise, having read only its first bytes (a stream is left where it was)."""
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            head = fh.read(len(SOI))
            if head != SOI or os.fstat(fh.fileno()).st_size > MAX_BYTES:
                return None
            return head + fh.read()
    start = source.tell()
    head = source.read(len(SOI))
    data = head + source.read(MAX_BYTES) if head == SOI else b""
    source.seek(start)
    return data if data and len(data) <= MAX_BYTES else None


def available() -> bool:
    return simplejpeg is not None


def plain_header(data: bytes) -> bool:
    """Whether the markers before the scan say the pixels need no turning and Pillow would take
    the header: at most one EXIF block, a TIFF one whose orientation (read as Pillow reads it)
    is 1 or absent; no XMP orientation (Pillow falls back to it); not a multi-picture file; no
    marker without a length before the scan, no JFIF or Adobe block shorter than its
    standard header. False on anything unexpected."""
    at, exif_blocks = 2, 0
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # no length: Pillow refuses or stops
            return False
        length = int.from_bytes(data[at + 2:at + 4], "big")
        payload = data[at + 4:at + 2 + length]
        if any(marker == m and payload.startswith(tag) and len(payload) < n
               for (m, tag), n in PARSED_APP.items()):
            return False
        if marker == 0xE1 and payload.startswith(EXIF):
            exif_blocks += 1
            if exif_blocks > 1 or exif_orientation(payload[len(EXIF):]) not in (None, 1):
                return False
        elif marker == 0xE1 and payload.startswith(XMP) and b"Orientation" in payload:
            return False
        elif marker == 0xE2 and payload.startswith(MPF):
            return False
        at += 2 + length
    return False


def exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of a TIFF block's first directory; None without one, -1 where the
    block cannot be read (the caller then leaves the file to Pillow)."""
    if tiff[:4] not in TIFF:
        return -1
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (first,) = struct.unpack_from(order + "I", tiff, 4)
        (entries,) = struct.unpack_from(order + "H", tiff, first)
        for k in range(entries):
            tag, kind, count = struct.unpack_from(order + "HHI", tiff, first + 2 + 12 * k)
            if tag == ORIENTATION:
                return struct.unpack_from(order + "H", tiff, first + 10 + 12 * k)[0] \
                    if kind == 3 and count == 1 else -1
    except (KeyError, struct.error):
        return -1
    return None


def draft_request(width: int, height: int, size: int) -> tuple[int, int]:
    """The size the draft path asks the decoder for: the image scaled so that its shortest
    edge is ``size``, rounded up."""
    short = min(width, height)
    return -(-width * size // short), -(-height * size // short)


def reduction(width: int, height: int, size: int) -> int:
    """Pillow's ``draft`` factor (8, 4, 2 or 1) for a shortest edge of at least ``size``."""
    wanted = draft_request(width, height, size)
    scale = min(width // wanted[0], height // wanted[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def decode_reduced(data: bytes, size: int, max_pixels: int) -> np.ndarray | None:
    """uint8 [H, W, 3] of the JPEG ``data`` reduced in the DCT domain as Pillow's ``draft``
    reduces it for a shortest edge of ``size``; None where Pillow must decide (see the module
    docstring)."""
    if simplejpeg is None or not data.startswith(SOI) or not plain_header(data):
        return None
    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        if colour not in ("YCbCr", "RGB") or width * height > limit:
            return None
        s = reduction(width, height, size)
        if s == 1:
            return None
        shape = (-(-height // s), -(-width // s), 3)
        rgb = simplejpeg.decode_jpeg(data, "RGB", min_height=shape[0], min_width=shape[1],
                                     min_factor=2)
    except Exception:  # any refusal: Pillow decides, and words the error
        return None
    return rgb if rgb.shape == shape else None
