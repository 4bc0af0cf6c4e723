"""Shard URL patterns -> the concrete URLs webdataset's ``gopen`` opens.

A pattern names one dataset's shards:

- a local brace pattern ``/data/cxr/shard-{000000..000099}.tar`` (webdataset's brace expansion; ``${VAR}`` is read
  from the environment variable ``WDS_VAR``, webdataset's convention), or a local shard directory (its ``*.tar``
  files, sorted), or ``file://...``;
- ``http://`` / ``https://`` (webdataset streams them with ``curl``), ``gs://`` (``gsutil``);
- ``s3://bucket/key`` -> ``pipe:aws s3 cp 's3://bucket/key' -`` (the AWS CLI streams the object to stdout);
- ``pipe:COMMAND`` (passed through: the command's stdout is the tar stream).

Several patterns of one dataset are joined with ``::`` (webdataset's syntax). Local files must exist when the
pattern is expanded, so a typo fails at start-up with the missing path named, not inside a DataLoader worker.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.shardlists import expand_urls

from raddino.errors import RaddinoError

# Schemes webdataset's gopen opens as they are (http(s) with curl, gs with gsutil).
_PASSTHROUGH_SCHEMES = ("http", "https", "gs")
_SHOWN_MISSING = 3  # missing local shards named in the error message


def s3_to_pipe(url: str) -> str:
    """``s3://bucket/key`` -> ``pipe:aws s3 cp 's3://bucket/key' -`` (the URL shell-quoted)."""
    return f"pipe:aws s3 cp {shlex.quote(url)} -"


def _brace_expand(pattern: str) -> list[str]:
    try:
        return [url for url in expand_urls(pattern) if url]
    except AssertionError as err:  # webdataset asserts on an undefined ${VAR}
        raise RaddinoError(f"shard pattern '{pattern}': {err}") from None


def _local_urls(path_text: str, pattern: str) -> list[str]:
    path = Path(path_text).expanduser()
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar") if not p.name.startswith("."))
        if not tars:
            raise RaddinoError(f"shard directory {path} (from '{pattern}') contains no .tar files")
        return tars
    return [str(path)]


def expand_shard_pattern(pattern: str) -> list[str]:
    """One dataset's pattern -> its shard URLs in pattern order, ready for ``webdataset.gopen``.

    Raises:
        RaddinoError: for an empty pattern, an unsupported scheme, a local shard that does not exist or a local
            directory without ``.tar`` files.
    """
    if not pattern or not pattern.strip():
        raise RaddinoError("empty shard pattern")
    urls: list[str] = []
    for url in _brace_expand(pattern.strip()):
        if url.startswith("pipe:"):
            urls.append(url)
            continue
        scheme = urlparse(url).scheme
        if scheme == "s3":
            urls.append(s3_to_pipe(url))
        elif scheme in _PASSTHROUGH_SCHEMES:
            urls.append(url)
        elif scheme == "file":
            urls.extend(_local_urls(url2pathname(urlparse(url).path), pattern))
        elif scheme == "" or len(scheme) == 1:  # a path (a one-letter "scheme" is a Windows drive)
            urls.extend(_local_urls(url, pattern))
        else:
            raise RaddinoError(
                f"shard URL '{url}' (from '{pattern}'): unsupported scheme '{scheme}'; use a local path, http(s)://, "
                "s3://, gs:// or pipe:COMMAND"
            )
    if not urls:
        raise RaddinoError(f"shard pattern '{pattern}' expands to no URLs")
    missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file()]
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (", ..." if len(missing) > _SHOWN_MISSING else "")
        raise RaddinoError(f"{len(missing)} of {len(urls)} shards of '{pattern}' not found: {shown}")
    return urls
