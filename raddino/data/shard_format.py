"""The shard format: how samples sit in ``shard-%06d.tar`` files, written and read (``docs/DATA.md``).

A shard is a plain (uncompressed, USTAR) tar file. A sample is a run of consecutive members sharing a key:
``<key>.png`` (the image) and ``<key>.json`` (its :class:`SampleRecord`), in that order. Keys contain no ``.`` and
no ``/``: webdataset groups members by the part of the name before the first dot of the base name
(:func:`split_member_name`), so a dot inside a key would split a sample in two. Readers also accept ``jpg`` / ``jpeg``
image members (:data:`IMAGE_EXTENSIONS`), as any WebDataset image shard has them.

Writing is deterministic: every member header carries mtime :data:`TAR_MTIME`, uid/gid 0, empty user/group names
and mode 0644, so the same samples give byte-identical shards. Each shard is written under a hidden temporary name
and renamed when complete (:class:`raddino.io.PendingFile`), so a ``shard-*.tar`` on disk is always whole.

Why not ``webdataset.TarWriter`` (webdataset 1.0.2, ``webdataset/writer.py``): it can be made reproducible
(``mtime=TAR_MTIME, user="", group="", mode=0o644, encoder=False``; uid/gid stay tarfile's 0; its ``format``
argument is not passed to ``tarfile.open``, so it writes PAX, which for short ASCII names gives the same header
bytes as USTAR) -- checked: for a sample written ``json`` first, its bytes equal this writer's. But it always writes
a sample's members in sorted extension order (``json`` before ``png``), while the builder writes ``png`` first, so
switching would change the bytes and manifest hashes of every shard. The writer here is a few lines of ``tarfile``
and hashes the bytes as it writes them (manifest).

Reading: the training stream reads shards (also remote, ``pipe:`` / ``http``) with webdataset's own tar reader and
picks the image member with :func:`image_extension`; local readers that need random access to members (the
labelled evaluation sets) use :func:`read_shard`, which gives every member's byte offset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from raddino.io import PendingFile

SHARD_PATTERN = "shard-%06d.tar"
# Tar header mtime of every member: 2000-01-01T00:00:00Z (fixed, so the bytes do not depend on when we ran).
TAR_MTIME = 946_684_800
TAR_MODE = 0o644
IMAGE_EXT = "png"  # the image member the builder writes
METADATA_EXT = "json"  # the SampleRecord member
MEMBER_EXTENSIONS = (IMAGE_EXT, METADATA_EXT)  # members of a sample, in tar order
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # image members readers accept, in order of preference


# ----------------------------------------------------------------------------------------------------------------
# Names


def member_name(key: str, ext: str) -> str:
    """``<key>.<ext>``; ``key`` must be dot- and slash-free (see the module docstring)."""
    assert key and "." not in key and "/" not in key, f"invalid sample key {key!r}"
    return f"{key}.{ext}"


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a member name, split as webdataset does: at the first dot of the base name (the key keeps
    any directory part); ``None`` for a name whose base name has no dot."""
    head, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return f"{head}{slash}{stem}", ext


def image_extension(members: Mapping[str, Any]) -> str | None:
    """The image member of a sample (``{ext: ...}``, e.g. a webdataset sample dict) by :data:`IMAGE_EXTENSIONS`."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


# ----------------------------------------------------------------------------------------------------------------
# The metadata member


@dataclasses.dataclass(frozen=True)
class IntensityMapping:
    """Source values ``low`` -> 0 and ``high`` -> 2**bit_depth - 1 (linear, clipped outside)."""

    scaling: str
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """The ``<key>.json`` member of a sample (schema documented in docs/DATA.md). Never holds a key or a path.

    Attributes:
        format: source format: ``"dicom"``, ``"png"`` or ``"jpeg"``.
        original_size: (H, W) of the source image.
        size: (H, W) of the stored PNG.
        bit_depth: of the stored PNG (8 or 16).
        intensity: how source values were mapped to stored ones.
        voi: DICOM only: the VOI step applied (``"lut"``, ``"window"``, ``"none"``).
        dicom: DICOM only: the allow-listed header fields.
        source_bit_depth: PNG/JPEG only: 8, or 16 for 16-bit PNGs.
        meta: carried CSV columns (strings), if any.
    """

    format: str
    original_size: tuple[int, int]
    size: tuple[int, int] = (0, 0)
    bit_depth: int = 8
    intensity: IntensityMapping | None = None
    voi: str | None = None
    dicom: dict[str, Any] | None = None
    source_bit_depth: int | None = None
    meta: dict[str, str] | None = None

    def to_json(self) -> bytes:
        """Compact ASCII JSON with sorted keys (deterministic bytes); ``None`` fields are left out."""
        payload = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sample_members(png: bytes, record: SampleRecord) -> list[tuple[str, bytes]]:
    """The ``(ext, bytes)`` members of one sample, in tar order."""
    return [(IMAGE_EXT, png), (METADATA_EXT, record.to_json())]


# ----------------------------------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


class _HashingFile:
    """Write-only file wrapper that hashes and counts what tarfile writes."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


def tar_entry_size(n_bytes: int) -> int:
    """Bytes a member of ``n_bytes`` takes in a tar: one header block plus the data padded to whole blocks."""
    return tarfile.BLOCKSIZE + -(-n_bytes // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes ``out_dir/shard-%06d.tar`` files, starting a new one before a shard would exceed ``max_count``
    samples or ``max_bytes`` bytes; :attr:`shards` lists the completed ones."""

    def __init__(self, out_dir: Path, *, max_count: int, max_bytes: int) -> None:
        self.out_dir, self.max_count, self.max_bytes = out_dir, max_count, max_bytes
        self.shards: list[ShardInfo] = []
        self._pending: PendingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._handle: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._count = 0
        self._bytes = 0

    @property
    def current_name(self) -> str:
        return SHARD_PATTERN % len(self.shards)

    def _open(self) -> None:
        self._pending = PendingFile(self.out_dir / self.current_name)
        self._handle = self._pending.tmp.open("wb")
        self._hashing = _HashingFile(self._handle)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
        self._count, self._bytes = 0, 0

    def add(self, key: str, members: Sequence[tuple[str, bytes]]) -> str:
        """Append one sample (``<key>.<ext>`` members, see :func:`sample_members`); returns its shard's file name."""
        size = sum(tar_entry_size(len(data)) for _, data in members)
        if self._tar is not None and (self._count >= self.max_count or self._bytes + size > self.max_bytes):
            self.close()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members:
            self._tar.addfile(_member_info(member_name(key, ext), len(data)), io.BytesIO(data))
        self._count += 1
        self._bytes += size
        return self.current_name

    def close(self) -> None:
        """Finish the open shard (if any) and move it to its final name."""
        if self._tar is None:
            return
        assert self._handle is not None and self._hashing is not None and self._pending is not None
        self._tar.close()
        self._handle.close()
        self._pending.commit()
        self.shards.append(
            ShardInfo(self.current_name, self._count, self._hashing.size, self._hashing.sha256.hexdigest())
        )
        self._tar = self._handle = self._hashing = self._pending = None

    def abort(self) -> None:
        """Drop the unfinished shard (on error / interrupt); completed shards stay."""
        if self._handle is not None:
            self._handle.close()
        if self._pending is not None:
            self._pending.discard()
        self._tar = self._handle = self._hashing = self._pending = None


# ----------------------------------------------------------------------------------------------------------------
# Reading (local files, random access)


@dataclasses.dataclass(frozen=True)
class ShardMember:
    """Where one member's bytes sit inside a tar file (read with a seek, no tar parsing at load time)."""

    tar: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


@dataclasses.dataclass
class ShardSample:
    """One sample of a shard: its key, its members by extension and its parsed ``<key>.json`` member (the builder's
    :class:`SampleRecord` as a dict; ``None`` when the sample has none)."""

    key: str
    members: dict[str, ShardMember]
    metadata: dict[str, Any] | None = None


def read_shard(path: Path) -> list[ShardSample]:
    """The samples of a local shard in tar order (members grouped by key as :func:`split_member_name` splits names;
    a key seen twice keeps its last member per extension). Non-file members and dot-free names are ignored; the
    JSON members are read and parsed here (they are small), the others only located.

    Raises:
        tarfile.TarError: the file is not a readable tar.
        ValueError: a JSON member is not valid JSON (``json.JSONDecodeError``).
    """
    samples: dict[str, ShardSample] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            parts = split_member_name(info.name) if info.isfile() else None
            if parts is None:
                continue
            key, ext = parts
            sample = samples.setdefault(key, ShardSample(key=key, members={}))
            sample.members[ext] = ShardMember(tar=path, offset=info.offset_data, size=info.size)
            if ext == METADATA_EXT:
                handle = tar.extractfile(info)
                assert handle is not None  # a regular file member
                sample.metadata = json.loads(handle.read())
    return list(samples.values())
