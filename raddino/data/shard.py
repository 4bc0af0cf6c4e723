"""Build PHI-free WebDataset tar shards from folders or lists of PNG / JPEG / DICOM radiographs.

One sample = two tar members with the same key: ``<key>.png`` (8- or 16-bit grayscale PNG, shorter side resized to
``size``) and ``<key>.json`` (preprocessing record, allow-listed DICOM fields, carried CSV columns). Keys are salted
HMAC-SHA256 hashes of the source path (hex, so dot-free: webdataset splits keys at the first dot). The link
source -> key lives only in a separate key-map CSV that the user keeps; shards and ``manifest.json`` never contain
source paths, names, IDs, dates or UIDs. The format is documented in ``docs/DATA.md``.

Pipeline per file (in worker processes): sniff the format from the first bytes -> decode to a single-channel float
image (PNG/JPEG: :func:`raddino.data.imageio.read_image`; DICOM: :func:`raddino.data.dicom.read_dicom`) -> resize
(antialiased) so the shorter side is ``size`` -> scale intensities to the full 8- or 16-bit range (per-image
min-max or percentiles) -> encode PNG. Files that cannot be used are skipped and counted by
:class:`~raddino.data.imageio.SkipReason`.

Determinism: inputs are sorted, processed in parallel but written in input order, and tar headers carry a fixed
mtime/owner, so the same inputs, options, salt and library versions give byte-identical shards.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import time
import types
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from raddino.data.dicom import DicomReadOptions, read_dicom
from raddino.data.imageio import HEADER_BYTES, SkipReason, UnusableImage, read_image, sniff_format
from raddino.data.shard_format import (
    MEMBER_EXTENSIONS,
    IntensityMapping,
    SampleRecord,
    ShardInfo,
    ShardWriter,
    sample_members,
)
from raddino.errors import RaddinoError
from raddino.io import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
KEY_HEX_CHARS = 32  # 128 bits of HMAC-SHA256
KEYMAP_HEADER = "#raddino-keymap salt="
SCALINGS = ("minmax", "percentile")
RESAMPLERS = types.MappingProxyType(
    {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "box": Image.Resampling.BOX,
    }
)
# File names picked up when walking a directory: image extensions, plus names without an extension or with a
# numeric one, which is how PACS exports name DICOM files (IM0001, 1.2.840.113619.2.55.3.1234).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic")
# Reasons that indicate a damaged or unreadable file (logged as warnings); the others are policy decisions.
_DAMAGE_REASONS = frozenset(
    {
        SkipReason.EMPTY,
        SkipReason.MISSING,
        SkipReason.UNREADABLE,
        SkipReason.TRUNCATED,
        SkipReason.UNDECODABLE,
        SkipReason.NO_DECODER,
        SkipReason.ERROR,
    }
)
# CSV column-name tokens that suggest identifying data (names, IDs, dates, addresses, paths); carrying such a
# column needs allow_identifying_columns=True. A guard against mistakes, not a PHI detector.
_IDENTIFYING_TOKENS = frozenset(
    "id ids uid uuid name names firstname lastname surname patientname patientid studyid seriesid mrn accession "
    "date dates datetime birth birthdate dob address street city zip zipcode postcode phone telephone email ssn "
    "filename file path filepath url uri".split()
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
        png_compress_level: zlib level 0-9 of the stored PNGs (1 is fast and nearly as small for radiographs).
        dicom: DICOM conversion and filtering options (``multi_frame`` also applies to animated PNG/JPEG).
    """

    size: int = 518
    upscale: bool = True
    bit_depth: int = 8
    scaling: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    resample: str = "bicubic"
    png_compress_level: int = 1
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


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One input file. ``source`` is its identity in the key map (path relative to the input directory, or the
    entry as written in the list/CSV); ``carried`` holds the CSV columns to copy into the sample's JSON."""

    source: str
    path: Path
    carried: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class InputSet:
    """Sorted inputs plus what discovery left out."""

    items: list[SourceItem]
    kind: str  # "directory", "csv" or "list"
    ignored_files: int = 0  # files in a directory tree that do not look like images (e.g. .txt, .csv)


@dataclasses.dataclass
class ProcessedSample:
    """A converted image: ``png`` bytes and its record."""

    png: bytes
    record: SampleRecord


@dataclasses.dataclass
class _Outcome:
    sample: ProcessedSample | None
    reason: SkipReason | None = None
    detail: str = ""


@dataclasses.dataclass
class ShardSummary:
    """Result of :func:`build_shards` (also written, without paths, to ``manifest.json``)."""

    inputs: int
    written: int
    skipped: dict[str, int]
    shards: list[ShardInfo]
    seconds: float
    manifest_path: Path
    key_map_path: Path

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def images_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def _is_candidate(name: str) -> bool:
    if name.startswith("."):
        return False
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_SUFFIXES or suffix == "" or suffix[1:].isdigit()


def _walk_directory(root: Path, exclude: Sequence[Path]) -> InputSet:
    excluded = {path.resolve() for path in exclude}
    items, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Hidden directories and the output directory (if it lies inside the input tree) are not inputs.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        for name in filenames:
            path = here / name
            if not _is_candidate(name):
                ignored += 1
                continue
            items.append(SourceItem(source=path.relative_to(root).as_posix(), path=path))
    items.sort(key=lambda item: item.source)
    return InputSet(items=items, kind="directory", ignored_files=ignored)


def _tokens(column: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", column)  # camelCase -> camel Case
    return [token for token in re.split(r"[^a-z0-9]+", spaced.lower()) if token]


def identifying_columns(columns: Sequence[str]) -> list[str]:
    """The columns whose names suggest identifying data (see ``_IDENTIFYING_TOKENS``)."""
    return [column for column in columns if any(token in _IDENTIFYING_TOKENS for token in _tokens(column))]


def _read_csv(path: Path, *, root: Path, path_column: str, carry: Sequence[str]) -> list[SourceItem]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c for c in (reader.fieldnames or []) if c is not None]
            if path_column not in columns:
                raise RaddinoError(
                    f"{path}: no column '{path_column}' with file paths (columns: {', '.join(columns)}); "
                    "choose one with --path-column"
                )
            missing = [c for c in carry if c not in columns]
            if missing:
                raise RaddinoError(f"{path}: --carry columns not found: {', '.join(missing)}")
            items = []
            for row in reader:
                entry = (row.get(path_column) or "").strip()
                if not entry:
                    continue
                carried = {c: (row.get(c) or "") for c in carry}
                items.append(SourceItem(source=entry, path=root / entry, carried=carried))
            return items
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RaddinoError(f"cannot read CSV {path}: {err}") from None


def _read_list(path: Path, *, root: Path) -> list[SourceItem]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RaddinoError(f"cannot read file list {path}: {err}") from None
    entries = [line.strip() for line in lines]
    return [SourceItem(source=e, path=root / e) for e in entries if e and not e.startswith("#")]


def collect_inputs(
    input_path: Path,
    *,
    root: Path | None = None,
    path_column: str = "path",
    carry: Sequence[str] = (),
    allow_identifying_columns: bool = False,
    exclude: Sequence[Path] = (),
) -> InputSet:
    """Find the input files.

    Args:
        input_path: a directory (walked recursively; hidden entries skipped; files with image extensions, no
            extension or a numeric extension are inputs), a ``.csv`` file with a ``path_column``, or a text file
            with one path per line (``#`` comments and blank lines ignored).
        root: directory that relative paths in a list/CSV are resolved against (default: the list's directory).
        path_column: CSV column holding the file paths.
        carry: CSV columns copied into every sample's JSON (``meta``), as strings.
        allow_identifying_columns: permit carrying columns whose names look identifying (name, id, date, ...).
        exclude: paths never taken as inputs (the output directory when it lies inside the input tree).

    Returns:
        :class:`InputSet` sorted by ``source``.
    """
    if not input_path.exists():
        raise RaddinoError(f"input not found: {input_path}")
    if input_path.is_dir():
        if carry:
            raise RaddinoError("--carry needs a CSV input (a directory has no metadata columns)")
        return _walk_directory(input_path, exclude)
    base = root if root is not None else input_path.parent
    if input_path.suffix.lower() == ".csv":
        if not allow_identifying_columns:
            flagged = identifying_columns(carry)
            if flagged:
                raise RaddinoError(
                    f"--carry columns look identifying: {', '.join(flagged)} (names, IDs, dates and paths must not "
                    "go into shards); pass --allow-identifying-columns if they are not"
                )
        items, kind = _read_csv(input_path, root=base, path_column=path_column, carry=carry), "csv"
    else:
        if carry:
            raise RaddinoError("--carry needs a CSV input")
        items, kind = _read_list(input_path, root=base), "list"
    items.sort(key=lambda item: item.source)
    return InputSet(items=items, kind=kind)


# ----------------------------------------------------------------------------------------------------------------
# Per-image processing (runs in worker processes)


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
    """(H, W) uint8 -> 8-bit grayscale PNG, uint16 -> 16-bit grayscale PNG (mode I;16, never through "L")."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


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


def _process_outcome(path: Path, options: PreprocessOptions) -> _Outcome:
    """Worker entry point: never raises for a bad file (the run goes on), reports why instead."""
    try:
        return _Outcome(sample=process_file(path, options))
    except UnusableImage as err:
        return _Outcome(sample=None, reason=err.reason, detail=err.detail)
    except MemoryError:
        return _Outcome(sample=None, reason=SkipReason.ERROR, detail="out of memory")
    except Exception as err:  # noqa: BLE001 - one exotic file must not end a run over a million files
        log.debug("unexpected error processing %s", path, exc_info=True)
        return _Outcome(sample=None, reason=SkipReason.ERROR, detail=f"{type(err).__name__}: {err}")


# ----------------------------------------------------------------------------------------------------------------
# Keys, key map, salt


def make_key(source: str, salt: str) -> str:
    """Sample key: the first 32 hex digits of HMAC-SHA256(salt, source) (dot-free, reveals nothing)."""
    digest = hmac.new(salt.encode("utf-8"), source.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return digest.hexdigest()[:KEY_HEX_CHARS]


def salt_fingerprint(salt: str) -> str:
    """A short hash of the salt for the manifest: tells which key map belongs to the shards without revealing it."""
    return hashlib.sha256(b"raddino-salt-fingerprint\0" + salt.encode("utf-8")).hexdigest()[:16]


def validate_salt(salt: str) -> str:
    if len(salt) < 8 or any(ch.isspace() for ch in salt) or not salt.isprintable():
        raise RaddinoError("--salt must be at least 8 printable characters without whitespace")
    return salt


def read_key_map_salt(path: Path) -> str:
    """The salt stored in the first line of an existing key map."""
    try:
        with path.open(encoding="utf-8", errors="surrogateescape") as handle:
            first = handle.readline().rstrip("\n")
    except OSError as err:
        raise RaddinoError(f"cannot read key map {path}: {err}") from None
    if not first.startswith(KEYMAP_HEADER):
        raise RaddinoError(f"{path} is not a raddino key map (first line must start with {KEYMAP_HEADER!r})")
    return validate_salt(first[len(KEYMAP_HEADER) :])


def default_key_map_path(out_dir: Path) -> Path:
    """``<out_dir>.keymap.csv``: beside the shard directory, not inside it, so the shards can be shared alone."""
    out_dir = out_dir.resolve()
    return out_dir.parent / f"{out_dir.name}.keymap.csv"


def _key_map_bytes(salt: str, rows: list[tuple[str, str, str, str]]) -> bytes:
    buffer = io.StringIO(newline="")
    buffer.write(f"{KEYMAP_HEADER}{salt}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["source", "key", "shard", "status"])
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8", "surrogateescape")


# ----------------------------------------------------------------------------------------------------------------
# Builder


def _check_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RaddinoError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise RaddinoError(f"output directory {out_dir} is not empty; pass --overwrite to replace its shards")


def _clean_out_dir(out_dir: Path) -> None:
    """Remove what an earlier run wrote, and only that: never wipe a directory given by mistake."""
    if out_dir.is_dir():
        stale = [*out_dir.glob("shard-*.tar"), *out_dir.glob(".shard-*.tar*.tmp"), *out_dir.glob(f"*{MANIFEST_NAME}*")]
        for path in stale:
            path.unlink()
        others = sorted(p.name for p in out_dir.iterdir())
        if others:
            log.warning("--overwrite: left %d other entries in %s: %s", len(others), out_dir, ", ".join(others[:5]))
    out_dir.mkdir(parents=True, exist_ok=True)


def _resolve_salt(salt: str | None, key_map: Path, *, overwrite: bool) -> str:
    if key_map.exists():
        if not overwrite:
            raise RaddinoError(
                f"key map {key_map} already exists; pass --overwrite (its salt is reused) or choose --key-map"
            )
        if salt is None:
            log.info("reusing the salt stored in %s", key_map)
            return read_key_map_salt(key_map)
    return validate_salt(salt) if salt is not None else secrets.token_hex(16)


def _software_versions() -> dict[str, str]:
    import PIL
    import pydicom

    import raddino

    return {
        "raddino": raddino.__version__,
        "pillow": PIL.__version__,
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
    }


@dataclasses.dataclass
class _Tally:
    """What the run did, in input order: counts for the manifest and the key-map rows (source, key, shard, status)."""

    skipped: Counter[str] = dataclasses.field(default_factory=Counter)
    formats: Counter[str] = dataclasses.field(default_factory=Counter)
    heights: list[int] = dataclasses.field(default_factory=list)
    widths: list[int] = dataclasses.field(default_factory=list)
    rows: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)

    def skip(self, item: SourceItem, key: str, outcome: _Outcome) -> None:
        assert outcome.reason is not None
        self.skipped[outcome.reason.value] += 1
        level = logging.WARNING if outcome.reason in _DAMAGE_REASONS else logging.DEBUG
        log.log(level, "skipped %s (%s: %s)", item.source, outcome.reason.value, outcome.detail)
        self.rows.append((item.source, key, "", f"skipped:{outcome.reason.value}"))

    def written(self, item: SourceItem, key: str, record: SampleRecord, shard: str) -> None:
        self.formats[record.format] += 1
        self.heights.append(record.size[0])
        self.widths.append(record.size[1])
        self.rows.append((item.source, key, shard, "written"))


def _duplicates(items: Sequence[SourceItem]) -> list[bool]:
    """Per item: the same file came earlier in the list (also via another spelling of its path)."""
    seen: set[Path] = set()
    duplicate = []
    for item in items:
        resolved = item.path.resolve()
        duplicate.append(resolved in seen)
        seen.add(resolved)
    return duplicate


def _converted(
    items: Sequence[SourceItem], *, options: PreprocessOptions, workers: int, progress: bool | None
) -> Iterator[tuple[int, _Outcome]]:
    """``(index, outcome)`` of every item, in input order; converted in ``workers`` processes (1: this process).
    Duplicates are not converted. Close the generator to stop the workers early."""
    duplicate = _duplicates(items)
    bar = None
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        pending: deque[tuple[int, concurrent.futures.Future[_Outcome] | _Outcome]] = deque()
        window = workers * 4  # results are consumed in input order; this bounds how many wait in memory
        next_index = 0

        def submit_until_full() -> None:
            nonlocal next_index
            while next_index < len(items) and len(pending) < window:
                i = next_index
                next_index += 1
                if duplicate[i]:
                    pending.append((i, _Outcome(None, SkipReason.DUPLICATE, "listed more than once")))
                elif pool is None:
                    pending.append((i, _process_outcome(items[i].path, options)))
                else:
                    pending.append((i, pool.submit(_process_outcome, items[i].path, options)))

        submit_until_full()  # starts the worker processes before tqdm starts its monitor thread
        bar = tqdm(total=len(items), unit="img", desc="shard", disable=None if progress is None else not progress)
        while pending:
            index, result = pending.popleft()
            yield index, result.result() if isinstance(result, concurrent.futures.Future) else result
            bar.update(1)
            submit_until_full()
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _write_samples(
    items: Sequence[SourceItem],
    keys: Sequence[str],
    *,
    writer: ShardWriter,
    options: PreprocessOptions,
    workers: int,
    progress: bool | None,
) -> _Tally:
    """Convert every item and append the usable ones to ``writer`` in input order; on any error the unfinished shard
    is dropped (complete shards stay)."""
    tally = _Tally()
    try:
        with contextlib.closing(_converted(items, options=options, workers=workers, progress=progress)) as outcomes:
            for index, outcome in outcomes:
                item, key = items[index], keys[index]
                if outcome.sample is None:
                    tally.skip(item, key, outcome)
                    continue
                record = dataclasses.replace(outcome.sample.record, meta=dict(item.carried) if item.carried else None)
                tally.written(item, key, record, writer.add(key, sample_members(outcome.sample.png, record)))
        writer.close()
    except BrokenProcessPool:
        writer.abort()
        raise RaddinoError(
            f"a worker process died (out of memory? try fewer than {workers} --workers); complete shards were kept"
        ) from None
    except BaseException:
        writer.abort()
        raise
    return tally


def _manifest(
    inputs: InputSet,
    *,
    options: PreprocessOptions,
    salt: str,
    max_count: int,
    max_bytes: int,
    tally: _Tally,
    shards: Sequence[ShardInfo],
) -> dict[str, Any]:
    """``manifest.json`` (schema in docs/DATA.md): options, counts, shard hashes; no paths, no salt."""
    items = inputs.items
    return {
        "format": "raddino-webdataset-shards",
        "version": MANIFEST_VERSION,
        "software": _software_versions(),
        "input_kind": inputs.kind,
        "options": {
            "preprocess": options.as_dict(),
            "max_count": max_count,
            "max_bytes": max_bytes,
            "carried_columns": sorted({c for item in items for c in item.carried}),
        },
        "keys": {
            "scheme": f"hmac-sha256(salt, source)[:{KEY_HEX_CHARS} hex]",
            "salt_fingerprint": salt_fingerprint(salt),
        },
        "members": list(MEMBER_EXTENSIONS),
        "counts": {
            "inputs": len(items),
            "written": len(items) - sum(tally.skipped.values()),
            "skipped": sum(tally.skipped.values()),
            "skipped_by_reason": dict(sorted(tally.skipped.items())),
            "written_by_format": dict(sorted(tally.formats.items())),
            "ignored_files": inputs.ignored_files,
        },
        "image_size": {
            "height": [min(tally.heights), max(tally.heights)] if tally.heights else None,
            "width": [min(tally.widths), max(tally.widths)] if tally.widths else None,
        },
        "total_bytes": sum(shard.bytes for shard in shards),
        "shards": [dataclasses.asdict(shard) for shard in shards],
    }


def build_shards(
    inputs: InputSet,
    *,
    out_dir: Path,
    options: PreprocessOptions,
    key_map: Path | None = None,
    salt: str | None = None,
    max_count: int = 1000,
    max_bytes: int = 500_000_000,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ShardSummary:
    """Convert ``inputs`` into ``out_dir/shard-%06d.tar`` + ``out_dir/manifest.json`` and write the key map.

    Args:
        inputs: from :func:`collect_inputs` (already sorted).
        out_dir: shard directory; must be empty or absent unless ``overwrite``.
        options: preprocessing options.
        key_map: source -> key CSV (default :func:`default_key_map_path`); it holds the salt and source paths, so
            it is kept apart from the shards.
        salt: key salt; default: the one in an existing key map (with ``overwrite``), else a new random one.
        max_count, max_bytes: a shard is closed before it would exceed either.
        workers: processes converting images (1 = in this process).
        overwrite: replace shards/manifest in ``out_dir`` and the key map.
        progress: tqdm bar (None = only on a terminal).

    Returns:
        :class:`ShardSummary`.
    """
    if max_count < 1 or max_bytes < 1:
        raise RaddinoError("max count and max bytes per shard must be positive")
    if workers < 1:
        raise RaddinoError(f"workers must be >= 1, got {workers}")
    out_dir = out_dir.resolve()
    key_map = (key_map or default_key_map_path(out_dir)).resolve()
    if out_dir in key_map.parents:
        log.warning("the key map %s is inside the shard directory; keep it private when sharing the shards", key_map)
    _check_out_dir(out_dir, overwrite=overwrite)
    chosen_salt = _resolve_salt(salt, key_map, overwrite=overwrite)
    _clean_out_dir(out_dir)

    started = time.perf_counter()
    items = inputs.items
    keys = [make_key(item.source, chosen_salt) for item in items]
    writer = ShardWriter(out_dir, max_count=max_count, max_bytes=max_bytes)
    tally = _write_samples(items, keys, writer=writer, options=options, workers=workers, progress=progress)
    seconds = time.perf_counter() - started

    manifest = _manifest(
        inputs,
        options=options,
        salt=chosen_salt,
        max_count=max_count,
        max_bytes=max_bytes,
        tally=tally,
        shards=writer.shards,
    )
    manifest_path = out_dir / MANIFEST_NAME
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    key_map.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(key_map, _key_map_bytes(chosen_salt, tally.rows))
    return ShardSummary(
        inputs=len(items),
        written=manifest["counts"]["written"],
        skipped=dict(sorted(tally.skipped.items())),
        shards=writer.shards,
        seconds=seconds,
        manifest_path=manifest_path,
        key_map_path=key_map,
    )
