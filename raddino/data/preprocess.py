"""Per-image conversion of the shard builder (runs in its worker processes): file -> stored PNG + record.

Sniff the format from the first bytes -> decode to a single-channel float image (PNG/JPEG:
:func:`raddino.data.imageio.read_image`; DICOM: :func:`raddino.data.dicom.read_dicom`) -> resize (antialiased) so
the shorter side is ``size`` -> scale intensities to the full 8- or 16-bit range (per-image min-max or percentiles)
-> encode PNG. A file that cannot be used raises :class:`~raddino.data.imageio.UnusableImage` with a
:class:`~raddino.data.imageio.SkipReason` (:func:`process_outcome` reports it instead, for the worker pool).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raddino.data.dicom import DicomReadOptions, read_dicom
from raddino.data.imageio import HEADER_BYTES, PNG_SIGNATURE, SkipReason, UnusableImage, read_image, sniff_format
from raddino.data.shard_format import IntensityMapping, SampleRecord
from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

SCALINGS = ("minmax", "percentile")
RESAMPLERS = types.MappingProxyType(
    {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "box": Image.Resampling.BOX,
    }
)


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
    """How every image is converted (all recorded in the manifest).

    Attributes:
        size: target length of the shorter side in pixels (0 = keep the original size).
        upscale: also enlarge images whose shorter side is below ``size`` (else they keep their size).
        bit_depth: 8 or 16 bits per stored pixel.
        scaling: ``"minmax"`` maps the resized image's min..max (after DICOM VOI) to 0..2**bit_depth-1;
            ``"percentile"`` maps the resized image's ``percentiles`` and clips outside.
        percentiles: (low, high) in percent, for ``scaling="percentile"``.
        resample: PIL resampling filter (antialiased when shrinking): bilinear, bicubic, lanczos or box.
        png_compress_level: zlib level 0-9 of the stored PNGs (3: smaller than 1 and as fast to decode; higher levels
            take several times longer to write for ~3 % smaller files).
        dicom: DICOM conversion and filtering options (``multi_frame`` also applies to animated PNG/JPEG).
    """

    size: int = 518
    upscale: bool = True
    bit_depth: int = 8
    scaling: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    resample: str = "bicubic"
    png_compress_level: int = 3
    dicom: DicomReadOptions = dataclasses.field(default_factory=DicomReadOptions)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise RaddinoError(f"size must be >= 0 (0 keeps the original size), got {self.size}")
        if self.bit_depth not in (8, 16):
            raise RaddinoError(f"bit depth must be 8 or 16, got {self.bit_depth}")
        if self.scaling not in SCALINGS:
            raise RaddinoError(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise RaddinoError(f"percentiles must satisfy 0 <= low < high <= 100, got {low} {high}")
        if self.resample not in RESAMPLERS:
            raise RaddinoError(f"resample must be one of {', '.join(RESAMPLERS)}, got {self.resample!r}")
        if not 0 <= self.png_compress_level <= 9:
            raise RaddinoError(f"PNG compress level must be 0-9, got {self.png_compress_level}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable view for the manifest."""
        out = dataclasses.asdict(self)
        out["percentiles"] = list(self.percentiles)
        dicom = out["dicom"]
        dicom["modalities"] = None if self.dicom.modalities is None else list(self.dicom.modalities)
        dicom["fields"] = list(self.dicom.fields)
        return out


@dataclasses.dataclass
class ProcessedSample:
    """A converted image: ``png`` bytes and its record."""

    png: bytes
    record: SampleRecord


@dataclasses.dataclass
class Outcome:
    """The result of converting one file: a sample, or why there is none."""

    sample: ProcessedSample | None
    reason: SkipReason | None = None
    detail: str = ""


def _decode(path: Path, options: PreprocessOptions) -> tuple[np.ndarray, SampleRecord]:
    """File -> ((H, W) float32 image, higher = brighter; record of the source)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UnusableImage(SkipReason.MISSING, "file not found") from None
    except OSError as err:
        raise UnusableImage(SkipReason.UNREADABLE, f"{type(err).__name__}: {err}") from None
    if not head:
        raise UnusableImage(SkipReason.EMPTY, "zero-byte file")
    kind = sniff_format(head, path.suffix)
    if kind is None:
        raise UnusableImage(SkipReason.UNSUPPORTED_FORMAT, "not a PNG, JPEG or DICOM file")
    if kind == "dicom":
        image = read_dicom(path, options.dicom)
        height, width = image.pixels.shape
        return image.pixels, SampleRecord("dicom", (height, width), voi=image.voi, dicom=image.fields)
    image = read_image(path, multi_frame=options.dicom.multi_frame, min_side=options.size or None)
    depth = 16 if image.pixels.dtype == np.uint16 else 8
    record = SampleRecord(image.format, image.original_size, source_bit_depth=depth)
    return image.pixels.astype(np.float32), record


def resized_shape(height: int, width: int, *, size: int, upscale: bool) -> tuple[int, int]:
    """(H, W) after resizing so the shorter side is ``size`` (aspect ratio kept, long side rounded)."""
    short = min(height, width)
    if size == 0 or short == size or (short < size and not upscale):
        return height, width
    scale = size / short
    if height <= width:
        return size, max(1, round(width * scale))
    return max(1, round(height * scale)), size


def resize_image(pixels: np.ndarray, *, shape: tuple[int, int], resample: str) -> np.ndarray:
    """(H, W) float32 -> ``shape`` (H', W') float32 with a PIL filter (antialiased when shrinking)."""
    new_h, new_w = shape
    if (new_h, new_w) == pixels.shape:
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    return np.asarray(image.resize((new_w, new_h), RESAMPLERS[resample]), dtype=np.float32)


def quantize(pixels: np.ndarray, *, low: float, high: float, bit_depth: int) -> np.ndarray:
    """Map [low, high] linearly to [0, 2**bit_depth - 1] (clipping outside), rounded; (H, W) -> uint8/uint16."""
    top = 2**bit_depth - 1
    scaled = (pixels.astype(np.float64) - low) * (top / (high - low))
    return np.rint(np.clip(scaled, 0, top)).astype(np.uint8 if bit_depth == 8 else np.uint16)


def encode_png(pixels: np.ndarray, *, compress_level: int) -> bytes:
    """(H, W) uint8 -> 8-bit grayscale PNG, uint16 -> 16-bit grayscale PNG, zlib level ``compress_level`` (0-9).

    Every row uses PNG's "up" filter (each byte minus the byte above it, modulo 256). Shards are written once and
    decoded at every epoch, and undoing "up" costs the decoder one addition per byte, where Pillow's adaptive choice
    (mostly Paeth on radiographs) costs a predictor per byte: on real chest radiographs at 518 px this decodes 1.9x
    faster at the same size (``benchmarks/png_codec.py``, docs/BENCHMARKS.md). The file is a plain PNG (IHDR, one
    IDAT, IEND; no ancillary chunks), written here because neither Pillow nor OpenCV < 4.12 lets the writer choose
    the filter; any PNG reader gives back the same pixels.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16) or min(pixels.shape) == 0:
        raise AssertionError(f"encode_png takes non-empty (H, W) uint8 / uint16, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape
    depth = 8 * pixels.dtype.itemsize
    rows = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder(">")).view(np.uint8).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "up"; the first row's "above" is zeros, so it is stored as is
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # colour type 0 (gray), compression 0 (deflate), filter method 0 (per-row filters), no interlace
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(filtered.tobytes(), compress_level)),
            chunk(b"IEND", b""),
        )
    )


def process_file(path: Path, options: PreprocessOptions) -> ProcessedSample:
    """Convert one file into a sample; raises :class:`UnusableImage` when it must be skipped."""
    pixels, record = _decode(path, options)
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise UnusableImage(SkipReason.UNDECODABLE, f"image of shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise UnusableImage(SkipReason.UNDECODABLE, "non-finite pixel values")
    if float(pixels.min()) == float(pixels.max()):
        raise UnusableImage(SkipReason.CONSTANT, f"every pixel is {float(pixels.min()):g}")
    # The target comes from the full-resolution size: a JPEG decoded at reduced scale gets the same shape.
    shape = resized_shape(*record.original_size, size=options.size, upscale=options.upscale)
    resized = resize_image(pixels, shape=shape, resample=options.resample)
    # Both statistics are taken on the resized image, i.e. on what is stored: min-max output always spans the
    # full range (resampling overshoot included, so nothing is clipped).
    low, high = float(resized.min()), float(resized.max())
    if options.scaling == "percentile":
        p_low, p_high = (float(v) for v in np.percentile(resized, options.percentiles))
        if p_high > p_low:  # else (> 99 % of the pixels share one value) keep min-max
            low, high = p_low, p_high
    if high <= low:
        raise UnusableImage(SkipReason.CONSTANT, f"every pixel of the resized image is {low:g}")
    stored = quantize(resized, low=low, high=high, bit_depth=options.bit_depth)
    record = dataclasses.replace(
        record,
        size=(int(stored.shape[0]), int(stored.shape[1])),
        bit_depth=options.bit_depth,
        intensity=IntensityMapping(options.scaling, low, high),
    )
    return ProcessedSample(png=encode_png(stored, compress_level=options.png_compress_level), record=record)


def process_outcome(path: Path, options: PreprocessOptions) -> Outcome:
    """Worker entry point: never raises for a bad file (the run goes on), reports why instead."""
    try:
        return Outcome(sample=process_file(path, options))
    except UnusableImage as err:
        return Outcome(sample=None, reason=err.reason, detail=err.detail)
    except MemoryError:
        return Outcome(sample=None, reason=SkipReason.ERROR, detail="out of memory")
    except Exception as err:  # noqa: BLE001 - one exotic file must not end a run over a million files
        log.debug("unexpected error processing %s", path, exc_info=True)
        return Outcome(sample=None, reason=SkipReason.ERROR, detail=f"{type(err).__name__}: {err}")
