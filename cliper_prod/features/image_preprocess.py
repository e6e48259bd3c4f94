"""CLIP image preprocessing with PIL and numpy only (no torchvision), equal to transformers'
``CLIPImageProcessor``: RGB, shortest edge resized to ``size`` (bicubic), centre crop,
scale to [0, 1], normalise with the model's mean and std, channels first.

``draft`` (opt-in) lets the JPEG decoder downscale in the DCT domain by 2, 4 or 8 while the
result keeps at least ``size`` pixels on its shortest edge (libjpeg-turbo through Pillow, or
through ``simplejpeg`` when installed: the same pixels, :mod:`~cliper_prod.features.turbo_jpeg`),
then resizes only the centre crop's box, bicubic, in numpy
(:mod:`~cliper_prod.features.bicubic`): about three times as fast as the exact path on a
640x480 photo, not bit-equal to the processor (its embedding cosine against the exact path is
bounded in tests/test_decode_paths.py, and ``embed_summary.json`` names the path). An image the
decoder did not downscale (not a JPEG, or under twice the size) takes the exact path. Without
``draft`` the output is the processor's.

Beyond the processor: EXIF orientation is applied first (a phone photo stands upright), and
images larger than ``max_pixels`` are refused before decoding (decompression bombs). Every
problem with a file (missing, not a regular file, unreadable, a name the file system refuses,
not an image) is an :class:`ImageDecodeError` that names the image by the label its caller
gives, never by the operating system's message, which quotes the absolute path.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cliper_prod.features import turbo_jpeg
from cliper_prod.features.bicubic import resize_box

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The draft path's promise: worst image-embedding cosine against the exact path on photo-like
#: 640x480 JPEGs (tests/test_decode_paths.py holds it to this).
DRAFT_MIN_COSINE = 0.999


class ImageDecodeError(Exception):
    """The file is missing, not an image, truncated or too large; the message says which."""


def problem(exc: Exception) -> str:
    """What went wrong, without the path an OS error quotes or a name's undecodable
    characters (an HTTP answer must neither show server paths nor fail to encode)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, UnicodeError):
        return "the name is not valid Unicode"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    if isinstance(exc, RuntimeError):  # pathlib's resolve() on Python < 3.13
        return "symbolic link loop"
    if isinstance(exc, struct.error):  # Pillow reading a cut-short EXIF block
        return "corrupt EXIF block"
    return str(exc) or type(exc).__name__


def unusable(exc: Exception, label: str) -> ImageDecodeError:
    """The error for a path the file system refuses (null byte, name too long, link loop)."""
    return ImageDecodeError(f"image not readable ({problem(exc)}): {label}")


@dataclass(frozen=True)
class ClipImagePreprocessor:
    size: int = 224  # shortest edge after resize
    crop: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    max_pixels: int = 64_000_000
    draft: bool = False  # DCT-domain JPEG downscale before the resize (see the module docstring)

    def __post_init__(self) -> None:
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} larger than the resized edge {self.size}")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ClipImagePreprocessor":
        """Read ``preprocessor_config.json`` of a CLIP checkpoint folder."""
        cfg = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        size = cfg.get("size", 224)
        crop = cfg.get("crop_size", 224)
        return cls(size=size["shortest_edge"] if isinstance(size, dict) else int(size),
                   crop=crop["height"] if isinstance(crop, dict) else int(crop),
                   mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                   std=tuple(cfg.get("image_std", CLIP_STD)),
                   resample=int(cfg.get("resample", Image.Resampling.BICUBIC)))

    @classmethod
    def from_dict(cls, settings: dict) -> "ClipImagePreprocessor":
        """From :meth:`as_dict`'s output (a bundle manifest's ``preprocess``)."""
        return cls(**{**settings, "mean": tuple(settings["mean"]),
                      "std": tuple(settings["std"])})

    def as_dict(self) -> dict:
        return {"size": self.size, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "resample": int(self.resample)}

    def __call__(self, image: Image.Image) -> np.ndarray:
        """float32 [3, crop, crop]."""
        return self.normalise(self.pixels(image))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 [3, crop, crop]: resized and cropped, before normalisation (the bytes a
        graph with normalisation inside takes; a quarter of the float32 array)."""
        image = _rgb(image)
        new_w, new_h, left, top = self._resized(*image.size)
        image = image.resize((new_w, new_h), resample=self.resample)
        arr = np.asarray(image)[top:top + self.crop, left:left + self.crop]
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def crop_pixels(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> [3, crop, crop] as :meth:`pixels`, resizing only the crop's box
        of the image (faster, not bit-equal; the draft path only): bicubic in numpy
        (:func:`~cliper_prod.features.bicubic.resize_box`), another filter by Pillow."""
        h, w = rgb.shape[:2]
        new_w, new_h, left, top = self._resized(w, h)
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        if self.resample == Image.Resampling.BICUBIC:
            return resize_box(rgb, box, self.crop)
        image = Image.fromarray(rgb).resize((self.crop, self.crop), self.resample, box=box)
        return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))

    def _resized(self, w: int, h: int) -> tuple[int, int, int, int]:
        """Width and height with the shortest edge at ``size``, and the crop's left and top."""
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return new_w, new_h, (new_w - self.crop) // 2, (new_h - self.crop) // 2

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [..., 3, H, W] -> float32: scale to [0, 1], subtract the mean, divide by the
        std, channel by channel; the same float32 operations, in the same order, as
        :meth:`~cliper_prod.export.pixels.with_uint8_input` writes into a graph."""
        shape = (3, 1, 1)
        return ((pixels.astype(np.float32) * np.float32(1 / 255)
                 - np.asarray(self.mean, np.float32).reshape(shape))
                / np.asarray(self.std, np.float32).reshape(shape))

    def load(self, path: Path, label: str | None = None, uint8: bool = False) -> np.ndarray:
        """Decode, orient and preprocess one file, or raise ImageDecodeError with the reason;
        ``label`` names it there (default: ``path``); ``uint8``: :meth:`pixels`, not
        normalised."""
        label = str(path) if label is None else label
        try:
            info = path.stat()
        except FileNotFoundError:
            raise ImageDecodeError(f"image not found: {label}") from None
        except (OSError, ValueError) as exc:
            raise unusable(exc, label) from None
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(f"image is not a regular file: {label}")
        if info.st_size == 0:
            raise ImageDecodeError(f"image file is empty: {label}")
        return self.decode(path, label, uint8)

    def decode(self, source: Path | BinaryIO, label: str, uint8: bool = False) -> np.ndarray:
        """Decode a file or an in-memory image (a served request's base64 bytes); ``label``
        names it in errors; ``uint8`` as in :meth:`load`."""
        try:
            data = turbo_jpeg.read_jpeg(source) if self.draft and turbo_jpeg.available() \
                else None
            if data is not None:  # a plain JPEG skips Pillow altogether
                rgb = turbo_jpeg.decode_reduced(data, self.size, self.max_pixels)
                if rgb is not None:
                    pixels = self.crop_pixels(rgb)
                    return pixels if uint8 else self.normalise(pixels)
                source = io.BytesIO(data)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(source) as img:
                    if img.width * img.height > self.max_pixels:
                        raise ImageDecodeError(f"image has {img.width}x{img.height} pixels, over "
                                               f"the limit of {self.max_pixels:,}: {label}")
                    if self.draft and self._draft(img):
                        pixels = self.crop_pixels(np.asarray(_rgb(_upright(img))))
                    else:
                        pixels = self.pixels(_upright(img))
                    return pixels if uint8 else self.normalise(pixels)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"image too large (decompression bomb guard): {label}") from exc
        except (OSError, ValueError, SyntaxError, struct.error) as exc:
            raise ImageDecodeError(f"not a readable image ({problem(exc)}): {label}") from exc

    def _draft(self, img: Image.Image) -> bool:
        """Ask the decoder (JPEG only; others ignore it) for the strongest reduction (1/2, 1/4
        or 1/8) whose shortest edge still holds ``size`` pixels; whether it reduced."""
        size = img.size
        img.draft(None, turbo_jpeg.draft_request(*size, self.size))
        return img.size != size


def _upright(img: Image.Image) -> Image.Image:
    """Decoded, EXIF orientation applied, 16-bit and transparent modes flattened."""
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # no full-size copy
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return Image.fromarray((np.asarray(img, np.float64) / 257).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _on_white(img)
    return img


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy it


def _on_white(img: Image.Image) -> Image.Image:
    """Composite transparency onto white, as product photos are shown."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
