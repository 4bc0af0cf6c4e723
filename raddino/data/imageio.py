"""Reading PNG/JPEG files into single-channel arrays, and the reasons a file cannot become a training image.

:func:`read_image` (files, for the shard builder) and :func:`decode_image` (shard members, evaluation images) give
``(H, W)`` ``uint8``, or ``uint16`` for 16-bit PNGs (they keep their depth; they are never passed through
``convert("L")``, which clips them to 8 bits). Colour is reduced to gray with ITU-R BT.601 luma and alpha is
composited onto black (radiograph background is dark). The file format is decided by the file's first
bytes, not its name (:func:`sniff_format`).

:class:`UnusableImage` carries a :class:`SkipReason`; the shard builder counts skipped files per reason.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import warnings
from collections.abc import Collection
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# ITU-R BT.601 luma weights (the ones PIL's convert("L") uses).
_LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG file
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_GRAY = 0  # IHDR colour type of grayscale without alpha
# Chunks after which OpenCV's decoding would differ from PIL + pil_to_gray: transparency (PIL keeps "L" and ignores
# it, libpng may expand it to alpha) and animation (frames).
_PNG_DIFFERENT_CHUNKS = (b"tRNS", b"acTL")
_DICOM_MAGIC_OFFSET = 128
_EXIF_ORIENTATION = 0x0112
HEADER_BYTES = 132  # enough for every magic number sniffed here (DICOM's "DICM" sits at bytes 128-131)
TRAINING_FORMATS = ("PNG", "JPEG", "MPO")  # PIL formats a training image may have (MPO: multi-picture JPEG)
# PIL modes that hold colour; decode_image(colour=True) keeps them as RGB.
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


class SkipReason(str, enum.Enum):
    """Why an input file produced no sample. The value is the name used in manifests and summaries."""

    EMPTY = "empty"  # zero-byte file
    MISSING = "missing"  # listed in a file list / CSV but not on disk
    DUPLICATE = "duplicate"  # the same file listed twice
    UNREADABLE = "unreadable"  # the OS refused to read it (permissions, I/O error)
    UNSUPPORTED_FORMAT = "unsupported_format"  # neither PNG, JPEG nor DICOM
    TRUNCATED = "truncated"  # file or pixel data ends early
    UNDECODABLE = "undecodable"  # corrupt or otherwise undecodable content
    NO_DECODER = "no_decoder"  # DICOM compressed transfer syntax without an installed decoder plugin
    NO_PIXEL_DATA = "no_pixel_data"  # DICOM without an image (reports, structured reports, DICOMDIR ...)
    MODALITY = "modality"  # DICOM modality not in the allowed list (default: radiography modalities)
    MULTI_FRAME = "multi_frame"  # several frames and the multi-frame policy is "skip"
    BURNED_IN_ANNOTATION = "burned_in_annotation"  # DICOM BurnedInAnnotation = YES (text, possibly PHI, in pixels)
    PHOTOMETRIC = "photometric"  # unsupported photometric interpretation / colour model
    CONSTANT = "constant"  # every pixel has the same value: nothing to learn from
    ERROR = "error"  # unexpected failure while processing (a bug or an exotic file); logged with details


class UnusableImage(Exception):
    """A file that cannot become a training image; ``reason`` says why (counted by the shard builder)."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def sniff_format(head: bytes, suffix: str = "") -> str | None:
    """``"png"``, ``"jpeg"``, ``"dicom"`` or ``None`` from a file's first :data:`HEADER_BYTES` bytes.

    DICOM files normally carry "DICM" at byte 128 (Part 10 preamble). Files named ``*.dcm``/``*.dicom`` without it
    are treated as DICOM too (pre-Part-10 files, read with ``force=True``); any other file without a known magic
    number is unsupported.
    """
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    if suffix.lower() in (".dcm", ".dicom", ".dic"):
        return "dicom"
    return None


def luma(rgb: np.ndarray, max_value: int) -> np.ndarray:
    """(H, W, 3) integer RGB -> (H, W) float64 BT.601 luma in [0, max_value] (no intermediate rounding)."""
    return np.clip(rgb.astype(np.float64) @ _LUMA_601, 0, max_value)


def _composite_on_black(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W) uint8 gray x (H, W) uint8 alpha / 255, rounded: transparent pixels become black."""
    return ((gray.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)


def pil_to_gray(image: Image.Image) -> np.ndarray:
    """A decoded PIL image -> (H, W) uint8, or uint16 for 16-bit grayscale modes.

    Modes: ``1`` -> 0/255; ``L`` as is; ``I;16*`` and ``I`` (how PIL opens 16-bit PNGs) -> uint16 (``I`` values
    outside 0..65535 are clipped, they cannot come from a PNG); colour modes (``RGB``, ``P``, ``CMYK``, ``YCbCr``)
    -> BT.601 luma via PIL's ``convert("L")`` (exact for 8-bit data, rounded); modes with alpha (``LA``, ``RGBA``,
    ``P`` with transparency) are composited onto black.
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "L":
        return np.asarray(image)
    if mode.startswith("I;16"):
        # np.asarray gives '>u2' for I;16B; astype makes it native-endian.
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    if mode in ("P", "PA"):
        # Palette entries are colours: go through RGBA so transparency (tRNS) is honoured.
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        alpha = np.asarray(image.getchannel("A"))
        base = image.convert("L") if mode in ("LA", "La") else image.convert("RGB").convert("L")
        return _composite_on_black(np.asarray(base), alpha)
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = image if mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb.convert("L"))
    raise UnusableImage(SkipReason.PHOTOMETRIC, f"unsupported PIL image mode {mode!r}")


def _is_plain_gray_png(data: bytes) -> bool:
    """True for a PNG of 8- or 16-bit gray pixels without transparency or animation (what the shard builder writes).

    Reads the chunk headers up to the first IDAT only (a few bytes; no CRC checks, the decoder does those).
    """
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = data[24], data[25]
    if colour_type != _PNG_GRAY or bit_depth not in (8, 16):
        return False
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunk = data[position + 4 : position + 8]
        if chunk == b"IDAT":
            return True
        if chunk in _PNG_DIFFERENT_CHUNKS:
            return False
        position += 12 + length  # length, type, data, CRC
    return False


def _decode_gray_png(data: bytes) -> np.ndarray | None:
    """OpenCV's decode of a plain gray PNG (:func:`_is_plain_gray_png`) -> (H, W) uint8 / uint16, None on failure.

    libpng through OpenCV is ~20% faster than PIL for 8-bit 512 px PNGs and gives the same pixels; a None (corrupt
    or truncated data, an image over OpenCV's size limit) sends the caller to PIL, which names the reason.
    """
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        return None
    return pixels


@dataclasses.dataclass
class DecodedImage:
    """A decoded PNG/JPEG.

    Attributes:
        pixels: ``(H, W)`` uint8, or uint16 for 16-bit grayscale PNGs, EXIF orientation applied.
        original_size: ``(H, W)`` of the full-resolution image (``pixels`` may be smaller, see ``min_side``).
        format: ``"png"`` or ``"jpeg"``.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    format: str


def read_image(path: str | Path, *, multi_frame: str = "skip", min_side: int | None = None) -> DecodedImage:
    """Decode a PNG or JPEG file into a single-channel array.

    Args:
        path: the file.
        multi_frame: ``"skip"`` raises :class:`UnusableImage` (``multi_frame``) for animated PNGs; ``"first"``
            keeps the first frame. Multi-picture JPEGs (MPO) always give their first, primary, picture.
        min_side: the caller will shrink the image so that its shorter side is ``min_side``; a JPEG may then be
            decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL ``draft``), never below ``min_side``
            (2x faster for 1000-2500 px JPEGs; the DCT scaling is itself an antialiasing filter). ``None``: full size.

    Returns:
        :class:`DecodedImage`.

    Raises:
        UnusableImage: ``truncated`` / ``undecodable`` / ``unreadable`` / ``photometric`` / ``multi_frame``.
    """
    try:
        with Image.open(path) as image, warnings.catch_warnings():
            # PIL warns (then raises) on decompression bombs; a warning here is not actionable per file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if image.format not in ("PNG", "JPEG", "MPO"):
                raise UnusableImage(SkipReason.UNSUPPORTED_FORMAT, f"{image.format} image")
            # An animated PNG is a multi-frame image; a multi-picture JPEG (MPO, from cameras) is one image plus
            # previews / a stereo partner, whose first frame is the image itself.
            if image.format == "PNG" and getattr(image, "n_frames", 1) > 1 and multi_frame == "skip":
                raise UnusableImage(SkipReason.MULTI_FRAME, f"animated PNG with {image.n_frames} frames")
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width  # these orientations transpose the image
            if min_side and image.format in ("JPEG", "MPO") and min(width, height) > 2 * min_side:
                scale = min_side / min(width, height)
                image.draft(None, (max(1, int(image.size[0] * scale)), max(1, int(image.size[1] * scale))))
            image.load()
            gray = pil_to_gray(ImageOps.exif_transpose(image))
            fmt = "png" if image.format == "PNG" else "jpeg"
            return DecodedImage(pixels=gray, original_size=(height, width), format=fmt)
    except UnusableImage:
        raise
    except UnidentifiedImageError as err:
        raise UnusableImage(SkipReason.UNDECODABLE, str(err)) from None
    except (PermissionError, IsADirectoryError) as err:
        raise UnusableImage(SkipReason.UNREADABLE, f"{type(err).__name__}: {err}") from None
    except OSError as err:
        # PIL reports short files as OSError("image file is truncated ...") or "broken data stream".
        message = str(err)
        reason = SkipReason.TRUNCATED if "truncated" in message else SkipReason.UNDECODABLE
        raise UnusableImage(reason, message) from None
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise UnusableImage(SkipReason.UNDECODABLE, f"{type(err).__name__}: {err}") from None


def decode_image(
    data: bytes | Path, *, colour: bool = False, formats: Collection[str] | None = TRAINING_FORMATS, orient: bool = True
) -> np.ndarray:
    """Decode image bytes (a shard member) or an image file into an array.

    Args:
        data: the encoded image, or the path of an image file.
        colour: keep colour images as (H, W, 3) RGB uint8 (alpha dropped) instead of reducing them to gray.
        formats: PIL formats accepted (default: PNG / JPEG / MPO); ``None`` accepts any format PIL reads (BMP, TIFF).
        orient: apply the EXIF orientation of non-PNG images (the shard builder's PNGs carry none).

    Returns:
        (H, W) uint8, or uint16 for 16-bit gray PNGs (never reduced to 8 bits; colour becomes BT.601 luma and alpha
        is composited onto black, see :func:`pil_to_gray`); with ``colour`` a colour image gives (H, W, 3) uint8.

    Raises:
        UnusableImage: ``missing``, ``unreadable``, ``unsupported_format``, ``truncated``, ``undecodable`` or
            ``photometric``.
    """
    # Shard members are plain gray PNGs: decode those with OpenCV (same pixels, faster); everything else, and any
    # failure, goes through PIL.
    if isinstance(data, bytes) and (formats is None or "PNG" in formats) and _is_plain_gray_png(data):
        pixels = _decode_gray_png(data)
        if pixels is not None:
            return pixels
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as image, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if formats is not None and image.format not in formats:
                raise UnusableImage(SkipReason.UNSUPPORTED_FORMAT, f"{image.format} image")
            image.load()
            if orient and image.format != "PNG":
                image = ImageOps.exif_transpose(image)
            if colour and image.mode in COLOUR_MODES:
                return np.asarray(image.convert("RGB"))
            return pil_to_gray(image)
    except UnusableImage:
        raise
    except UnidentifiedImageError as err:
        raise UnusableImage(SkipReason.UNDECODABLE, str(err)) from None
    except FileNotFoundError:
        raise UnusableImage(SkipReason.MISSING, "file not found") from None
    except (PermissionError, IsADirectoryError) as err:
        raise UnusableImage(SkipReason.UNREADABLE, f"{type(err).__name__}: {err}") from None
    except OSError as err:  # PIL: "image file is truncated", "broken data stream", ...
        reason = SkipReason.TRUNCATED if "truncated" in str(err) else SkipReason.UNDECODABLE
        raise UnusableImage(reason, str(err)) from None
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise UnusableImage(SkipReason.UNDECODABLE, f"{type(err).__name__}: {err}") from None
