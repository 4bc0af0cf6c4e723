"""Inputs of the shard builder: a directory tree, a CSV with a path column (and carried columns) or a file list.

:func:`collect_inputs` gives an :class:`InputSet` sorted by ``source`` (the identity keyed in the key map), so the
shards do not depend on the order the file system lists files in.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

from raddino.errors import RaddinoError

# File names picked up when walking a directory: image extensions, plus names without an extension or with a
# numeric one, which is how PACS exports name DICOM files (IM0001, 1.2.840.113619.2.55.3.1234).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic")
# CSV column-name tokens that suggest identifying data (names, IDs, dates, addresses, paths); carrying such a
# column needs allow_identifying_columns=True. A guard against mistakes, not a PHI detector.
_IDENTIFYING_TOKENS = frozenset(
    "id ids uid uuid name names firstname lastname surname patientname patientid studyid seriesid mrn accession "
    "date dates datetime birth birthdate dob address street city zip zipcode postcode phone telephone email ssn "
    "filename file path filepath url uri".split()
)


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
