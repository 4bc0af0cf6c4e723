"""Build PHI-free WebDataset tar shards from folders or lists of PNG / JPEG / DICOM radiographs.

One sample = two tar members with the same key: ``<key>.png`` (8- or 16-bit grayscale PNG, shorter side resized to
``size``) and ``<key>.json`` (preprocessing record, allow-listed DICOM fields, carried CSV columns). Keys are salted
HMAC-SHA256 hashes of the source path (hex, so dot-free: webdataset splits keys at the first dot). The link
source -> key lives only in a separate key-map CSV that the user keeps; shards and ``manifest.json`` never contain
source paths, names, IDs, dates or UIDs. The format is documented in ``docs/DATA.md`` and owned by
:mod:`raddino.data.shard_format`.

The pipeline (:func:`build_shards`): inputs (:mod:`raddino.data.shard_inputs`, sorted) -> salted keys (here) ->
per-file conversion in worker processes (:mod:`raddino.data.preprocess`) -> shards written in input order
(:class:`raddino.data.shard_format.ShardWriter`) -> manifest and key map. Files that cannot be used are skipped and
counted by :class:`~raddino.data.imageio.SkipReason`.

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
import secrets
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from raddino.data.imageio import SkipReason
from raddino.data.preprocess import Outcome, PreprocessOptions, process_outcome
from raddino.data.shard_format import (
    MEMBER_EXTENSIONS,
    SampleRecord,
    ShardInfo,
    ShardWriter,
    sample_members,
)
from raddino.data.shard_inputs import InputSet, SourceItem
from raddino.errors import RaddinoError
from raddino.io import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
KEY_HEX_CHARS = 32  # 128 bits of HMAC-SHA256
KEYMAP_HEADER = "#raddino-keymap salt="
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

    def skip(self, item: SourceItem, key: str, outcome: Outcome) -> None:
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
) -> Iterator[tuple[int, Outcome]]:
    """``(index, outcome)`` of every item, in input order; converted in ``workers`` processes (1: this process).
    Duplicates are not converted. Close the generator to stop the workers early."""
    duplicate = _duplicates(items)
    bar = None
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        pending: deque[tuple[int, concurrent.futures.Future[Outcome] | Outcome]] = deque()
        window = workers * 4  # results are consumed in input order; this bounds how many wait in memory
        next_index = 0

        def submit_until_full() -> None:
            nonlocal next_index
            while next_index < len(items) and len(pending) < window:
                i = next_index
                next_index += 1
                if duplicate[i]:
                    pending.append((i, Outcome(None, SkipReason.DUPLICATE, "listed more than once")))
                elif pool is None:
                    pending.append((i, process_outcome(items[i].path, options)))
                else:
                    pending.append((i, pool.submit(process_outcome, items[i].path, options)))

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
