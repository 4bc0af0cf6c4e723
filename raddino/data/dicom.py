"""DICOM radiographs -> single-channel float arrays in display orientation (higher = brighter), with pydicom 3.

Pipeline for MONOCHROME1/2 images (PS3.3 C.11 and C.7.6.3.1.2):

1. decode the stored values (pydicom masks the unused high bits of e.g. 12-in-16-bit storage and sign-extends
   signed pixels); compressed transfer syntaxes go through the installed pydicom decoder plugins (pylibjpeg,
   Pillow, ...); a syntax with no installed decoder is skipped as ``no_decoder``;
2. modality LUT: Modality LUT Sequence, or Rescale Slope/Intercept;
3. VOI: the VOI LUT Sequence, or Window Center/Width (linear / linear-exact / sigmoid), the first one of several
   unless ``voi_index`` says otherwise; ``voi="none"`` skips this step;
4. MONOCHROME1 is inverted *after* VOI against the theoretical output range ``[lo, hi]`` of the previous step:
   ``v -> lo + hi - v``. For unsigned data with a window this is ``(2**BitsStored - 1) - v``.

RGB / YBR images (rare for radiographs: secondary captures) are reduced to BT.601 luma; PALETTE COLOR is skipped.

Policy checks (all before decoding, each a :class:`~raddino.data.imageio.SkipReason`): ``BurnedInAnnotation = YES``
(text in the pixels that may be PHI), modality not in the allowed list (default: radiography), several frames.

Only an allow-list of non-identifying header fields (:data:`ALLOWED_FIELDS`) ever leaves this module; names, IDs,
dates and UIDs never do.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_windowing, get_decoder
from pydicom.pixels.utils import get_expected_length, get_nr_frames

from raddino.data.imageio import SkipReason, UnusableImage, luma
from raddino.errors import RaddinoError

log = logging.getLogger(__name__)

# Projection radiography modalities (PS3.3 C.7.3.1.1.1): computed / digital radiography, "DR" as some vendors
# write it, conventional radiography, mammography, intra-oral and panoramic dental X-ray.
RADIOGRAPHY_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "RG", "MG", "IO", "PX")

# Header fields that may be copied into a shard: acquisition geometry and coarse demographics that identify
# nobody (HIPAA Safe Harbor: sex is not an identifier; ages of 90 or more are aggregated, see _sanitize_age).
ALLOWED_FIELDS: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "PatientSex",
    "PatientAge",
)
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}$")  # the CS value representation's character set
_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
VOI_MODES = ("auto", "window", "none")
MULTI_FRAME_POLICIES = ("skip", "first")


@dataclasses.dataclass(frozen=True)
class DicomReadOptions:
    """How DICOM files are filtered and converted (every field is a documented ``raddino shard`` option).

    Attributes:
        voi: ``"auto"`` = VOI LUT Sequence if present, else Window Center/Width, else nothing; ``"window"`` =
            prefer Window Center/Width over a VOI LUT Sequence; ``"none"`` = no VOI step.
        voi_index: which of several windows / VOI LUTs (0 = the first); out-of-range falls back to the first.
        modalities: allowed Modality values; ``None`` allows every modality.
        multi_frame: ``"skip"`` multi-frame images, or keep the ``"first"`` frame.
        skip_burned_in: skip images whose BurnedInAnnotation is YES.
        fields: header fields to copy (a subset of :data:`ALLOWED_FIELDS`).
    """

    voi: str = "auto"
    voi_index: int = 0
    modalities: tuple[str, ...] | None = RADIOGRAPHY_MODALITIES
    multi_frame: str = "skip"
    skip_burned_in: bool = True
    fields: tuple[str, ...] = ALLOWED_FIELDS

    def __post_init__(self) -> None:
        if self.modalities is not None:
            # Modality is a code string (upper case); normalise what the caller wrote.
            object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities))
        if self.voi not in VOI_MODES:
            raise RaddinoError(f"voi must be one of {VOI_MODES}, got {self.voi!r}")
        if self.multi_frame not in MULTI_FRAME_POLICIES:
            raise RaddinoError(f"multi_frame must be one of {MULTI_FRAME_POLICIES}, got {self.multi_frame!r}")
        if self.voi_index < 0:
            raise RaddinoError(f"voi_index must be >= 0, got {self.voi_index}")
        unknown = sorted(set(self.fields) - set(ALLOWED_FIELDS))
        if unknown:
            raise RaddinoError(
                f"DICOM fields {', '.join(unknown)} are not in the allow-list {', '.join(ALLOWED_FIELDS)}"
            )


@dataclasses.dataclass
class DicomImage:
    """One decoded DICOM frame.

    Attributes:
        pixels: ``(H, W)`` float32 display values, higher = brighter (MONOCHROME1 already inverted).
        value_range: ``(lo, hi)``, the theoretical range of ``pixels`` (VOI output range, else the modality
            range of the stored bit depth).
        voi: which VOI step was applied: ``"lut"``, ``"window"`` or ``"none"``.
        fields: allow-listed header fields (JSON-serialisable, never identifying).
    """

    pixels: np.ndarray
    value_range: tuple[float, float]
    voi: str
    fields: dict[str, Any]


def _stored_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Smallest and largest storable value for BitsStored / PixelRepresentation."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _rescale(ds: pydicom.Dataset, lo: float, hi: float) -> tuple[float, float]:
    """Map a range through Rescale Slope/Intercept when both are present (a negative slope swaps the ends)."""
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def _modality_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Theoretical output range of the modality LUT step (PS3.3 C.11.1)."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    return _rescale(ds, *_stored_range(ds))


def _window_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Output range of pydicom's ``apply_windowing`` (the same rule, so MONOCHROME1 inversion matches it)."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        lo, hi = _stored_range(ds)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        # pydicom maps y_min/y_max through the rescale without sorting; keep its orientation.
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


def _n_alternatives(ds: pydicom.Dataset, keyword: str) -> int:
    if keyword == "VOILUTSequence":
        return len(ds.get("VOILUTSequence") or [])
    element = ds.get(keyword)
    if element is None:
        return 0
    return len(element) if isinstance(element, (list, tuple, pydicom.multival.MultiValue)) else 1


def _valid_voi_lut(ds: pydicom.Dataset) -> bool:
    items = ds.get("VOILUTSequence") or []
    return bool(items) and all(
        item.get("LUTDescriptor") is not None and item.get("LUTData") is not None for item in items
    )


def _lut_table(ds: pydicom.Dataset, item: pydicom.Dataset) -> tuple[np.ndarray, int, int]:
    """A VOI LUT item -> (table (entries,) int64, first mapped value, bits per entry)."""
    entries, first, depth = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16  # 0 means 65536 entries (PS3.3 C.11.2.1.1)
    element = item["LUTData"]
    if element.VR == "OW" or isinstance(element.value, bytes):
        raw = bytes(element.value)
        little = ds.original_encoding[1] is not False
        if depth == 8 and len(raw) in (entries, entries + 1):  # 8-bit entries packed in bytes (odd count padded)
            table = np.frombuffer(raw[:entries], dtype=np.uint8)
        else:
            table = np.frombuffer(raw[: 2 * entries], dtype="<u2" if little else ">u2")
    else:
        values = element.value
        table = np.asarray(values if isinstance(values, (list, pydicom.multival.MultiValue)) else [values])
    if len(table) < entries:
        raise ValueError(f"VOI LUT has {len(table)} entries, its descriptor says {entries}")
    return table[:entries].astype(np.int64), first, depth


def _apply_lut(values: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """PS3.3 C.11.2.1.1: values below ``first`` map to the first entry, beyond the table to the last one."""
    # Index arithmetic in int64: pydicom 3.0's apply_voi indexes in the LUT's own (uint8) dtype, which wraps for
    # 8-bit LUTs with more than 256 entries.
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)
    return table[index]


def _apply_voi(
    values: np.ndarray, ds: pydicom.Dataset, *, voi: str, voi_index: int
) -> tuple[np.ndarray, str, tuple[float, float] | None]:
    """VOI step -> (values, "lut" | "window" | "none", output range or None when no VOI was applied)."""
    if voi == "none":
        return values, "none", None
    has_lut = _valid_voi_lut(ds)
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    use_lut = has_lut and (voi == "auto" or not has_window)
    if use_lut:
        index = voi_index if voi_index < _n_alternatives(ds, "VOILUTSequence") else 0
        table, first, depth = _lut_table(ds, ds.VOILUTSequence[index])
        return _apply_lut(values, table, first), "lut", (0.0, float(2**depth - 1))
    if has_window:
        n = min(_n_alternatives(ds, "WindowCenter"), _n_alternatives(ds, "WindowWidth"))
        index = voi_index if voi_index < n else 0
        try:
            windowed = apply_windowing(values, ds, index=index)
        except ValueError as err:
            # e.g. Window Width < 1: an unusable window, not an unusable image; fall back to the full range.
            log.debug("ignoring invalid window (%s)", err)
            return values, "none", None
        return windowed, "window", _window_range(ds)
    return values, "none", None


def _sanitize_age(value: str) -> str | None:
    match = _AGE_STRING.match(value)
    if not match:
        return None
    if match.group(2) == "Y" and int(match.group(1)) >= 90:
        return "090Y+"  # 90 or older: aggregated (ages >= 90 are identifying under HIPAA Safe Harbor)
    return value


def _field_value(ds: pydicom.Dataset, keyword: str) -> Any:
    """A JSON-serialisable, validated value of an allow-listed field, or None (absent / not well-formed)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword in ("BitsStored", "Rows", "Columns"):
        return int(value)
    if keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            spacing = [float(v) for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value])]
        except (TypeError, ValueError):
            return None
        return spacing if len(spacing) == 2 else None
    text = str(value).strip().upper()
    if keyword == "PatientAge":
        return _sanitize_age(text)
    if keyword == "PatientSex":
        return text if text in ("M", "F", "O") else None
    # Code strings only: anything else (free text) could carry identifying information.
    return text if _CODE_STRING.match(text) else None


def allowed_fields(ds: pydicom.Dataset, fields: tuple[str, ...] = ALLOWED_FIELDS) -> dict[str, Any]:
    """The allow-listed, validated header fields of ``ds`` (absent or malformed values are left out)."""
    out = {}
    for keyword in fields:
        if keyword not in ALLOWED_FIELDS:
            raise ValueError(f"{keyword} is not an allow-listed DICOM field")
        value = _field_value(ds, keyword)
        if value is not None:
            out[keyword] = value
    return out


def _dcmread(path: Path) -> pydicom.Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # see dataset_to_image
            return pydicom.dcmread(path, force=True)
    except (PermissionError, IsADirectoryError) as err:
        raise UnusableImage(SkipReason.UNREADABLE, f"{type(err).__name__}: {err}") from None
    except EOFError as err:
        raise UnusableImage(SkipReason.TRUNCATED, f"EOFError: {err}") from None
    except (InvalidDicomError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UnusableImage(SkipReason.UNDECODABLE, f"{type(err).__name__}: {err}") from None


def _frame_count(ds: pydicom.Dataset) -> int:
    try:
        return int(get_nr_frames(ds, warn=False))
    except (TypeError, ValueError):
        raise UnusableImage(SkipReason.UNDECODABLE, f"invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from None


def check_policy(ds: pydicom.Dataset, options: DicomReadOptions) -> None:
    """Raise :class:`UnusableImage` if ``ds`` must be skipped before decoding (cheap header checks only).

    Order: is it an image at all (else ``unsupported_format`` / ``truncated`` / ``no_pixel_data``), then the
    policies (``burned_in_annotation``, ``modality``, ``multi_frame``), then ``photometric``.
    """
    if "PixelData" not in ds:
        if not any(element.keyword for element in ds):
            # force=True "reads" any bytes as a dataset of unknown tags: this was not DICOM.
            raise UnusableImage(SkipReason.UNSUPPORTED_FORMAT, "no standard DICOM element: not a DICOM file")
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnusableImage(SkipReason.NO_PIXEL_DATA, "float pixel data (parametric map), not a radiograph")
        if "Rows" in ds or "BitsAllocated" in ds:
            # pydicom reads a file cut inside the header without error and just stops: an image header without
            # its pixel data means the file was cut short.
            raise UnusableImage(SkipReason.TRUNCATED, "image attributes present but no pixel data")
        raise UnusableImage(SkipReason.NO_PIXEL_DATA, "no pixel data element")
    if options.skip_burned_in and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise UnusableImage(SkipReason.BURNED_IN_ANNOTATION, "BurnedInAnnotation is YES")
    if options.modalities is not None:
        modality = str(ds.get("Modality", "")).strip().upper()
        if modality not in options.modalities:
            raise UnusableImage(SkipReason.MODALITY, f"modality {modality or '(missing)'} is not allowed")
    frames = _frame_count(ds)
    if frames > 1 and options.multi_frame == "skip":
        raise UnusableImage(SkipReason.MULTI_FRAME, f"{frames} frames")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME + _COLOUR:
        raise UnusableImage(SkipReason.PHOTOMETRIC, f"photometric interpretation {photometric or '(missing)'}")


def _check_decodable(ds: pydicom.Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        # force=True reads pre-Part-10 files without file meta: use the encoding pydicom detected while reading.
        implicit, little = ds.original_encoding
        if meta is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        if little is False:
            syntax = pydicom.uid.ExplicitVRBigEndian
        elif implicit is False:
            syntax = pydicom.uid.ExplicitVRLittleEndian
        else:
            syntax = pydicom.uid.ImplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnusableImage(SkipReason.NO_DECODER, f"transfer syntax {syntax} is not supported by pydicom") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise UnusableImage(SkipReason.NO_DECODER, f"no decoder installed for {syntax.name} ({missing})")
    if "PixelData" in ds and not syntax.is_encapsulated:
        expected = get_expected_length(ds, "bytes")
        actual = len(ds.PixelData)
        if actual < expected:
            raise UnusableImage(SkipReason.TRUNCATED, f"pixel data has {actual} bytes, expected {expected}")


def _decode_first_frame(ds: pydicom.Dataset) -> np.ndarray:
    try:
        return ds.pixel_array if _frame_count(ds) == 1 else pydicom.pixels.pixel_array(ds, index=0)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, OSError) as err:
        # RuntimeError: "all available plugins failed"; ValueError: inconsistent header / short buffer.
        raise UnusableImage(SkipReason.UNDECODABLE, f"{type(err).__name__}: {err}") from None


def dataset_to_image(ds: pydicom.Dataset, options: DicomReadOptions) -> DicomImage:
    """Convert a read dataset (see module docstring); raises :class:`UnusableImage` for files to skip."""
    with warnings.catch_warnings():
        # pydicom warns about non-conformant values (wrong VR, bad lengths) it can still use; those are normal in
        # clinical data and would flood the log. Values it cannot use raise and are reported per file.
        warnings.simplefilter("ignore", UserWarning)
        return _dataset_to_image(ds, options)


def _dataset_to_image(ds: pydicom.Dataset, options: DicomReadOptions) -> DicomImage:
    check_policy(ds, options)
    _check_decodable(ds)
    stored = _decode_first_frame(ds)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    fields = allowed_fields(ds, options.fields)
    if photometric in _COLOUR:
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise UnusableImage(SkipReason.PHOTOMETRIC, f"{photometric} image with shape {stored.shape}")
        top = float(2 ** int(ds.BitsStored) - 1)
        return DicomImage(luma(stored, int(top)).astype(np.float32), (0.0, top), "none", fields)
    if stored.ndim != 2:
        raise UnusableImage(SkipReason.PHOTOMETRIC, f"{photometric} image with shape {stored.shape}")
    try:
        values = apply_modality_lut(stored, ds)
        values, voi, voi_range = _apply_voi(values, ds, voi=options.voi, voi_index=options.voi_index)
        lo, hi = voi_range if voi_range is not None else _modality_range(ds)
    except (ValueError, IndexError, NotImplementedError, AttributeError, TypeError) as err:
        # Malformed LUT / window / bit-depth attributes.
        raise UnusableImage(SkipReason.UNDECODABLE, f"modality/VOI step: {type(err).__name__}: {err}") from None
    values = values.astype(np.float64)
    if photometric == "MONOCHROME1":
        # Inverted after VOI, against the theoretical range (not the image's own min/max, which would make the
        # result depend on image content).
        values = (lo + hi) - values
    return DicomImage(values.astype(np.float32), (float(min(lo, hi)), float(max(lo, hi))), voi, fields)


def read_dicom(path: str | Path, options: DicomReadOptions | None = None) -> DicomImage:
    """Read one DICOM file into a :class:`DicomImage` (``pixels`` ``(H, W)`` float32, higher = brighter).

    Raises:
        UnusableImage: with the reason the file is skipped (policy, missing decoder, truncated, undecodable ...).
    """
    return dataset_to_image(_dcmread(Path(path)), options or DicomReadOptions())
