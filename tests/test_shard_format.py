"""The shard format module: one writer and one reader for the builder's and the benchmark's shards; atomic writes."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image
from webdataset.tariterators import base_plus_ext

from raddino.commands.bench import _write_synthetic_shards
from raddino.data.imageio import UnusableImage, decode_image
from raddino.data.preprocess import PreprocessOptions
from raddino.data.shard import build_shards
from raddino.data.shard_format import (
    IMAGE_EXT,
    METADATA_EXT,
    TAR_MTIME,
    read_shard,
    split_member_name,
)
from raddino.data.shard_inputs import collect_inputs
from raddino.io import atomic_path, atomic_write_bytes, atomic_write_text


def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _check_shards(directory: Path) -> list[tuple[str, np.ndarray, dict]]:
    """Read every shard with read_shard and with webdataset's reader; both must give the same samples."""
    ours = []
    for tar_path in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
                    TAR_MTIME,
                    0,
                    0,
                    "",
                    "",
                    0o644,
                )
            assert tar.getnames()[:2] == [f"{tar.getnames()[0].split('.')[0]}.{ext}" for ext in (IMAGE_EXT, "json")]
        for sample in read_shard(tar_path):
            assert sorted(sample.members) == [METADATA_EXT, IMAGE_EXT]
            ours.append((sample.key, decode_image(sample.members[IMAGE_EXT].read()), sample.metadata))
    pattern = [str(p) for p in sorted(directory.glob("shard-*.tar"))]
    theirs = [(s["__key__"], s[IMAGE_EXT], s[METADATA_EXT]) for s in webdataset.WebDataset(pattern, shardshuffle=False)]
    assert [key for key, _, _ in ours] == [key for key, _, _ in theirs]
    for (_, image, _), (_, png, _) in zip(ours, theirs, strict=True):
        assert np.array_equal(image, decode_image(png))
    return ours


def test_bench_and_builder_shards_share_the_format_and_are_reproducible(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 36 + i), dtype=np.uint8)).save(src / f"img{i}.png")
    inputs = collect_inputs(src)
    options = PreprocessOptions(size=32)
    build_shards(inputs, out_dir=tmp_path / "built", options=options, salt="fixed-salt", max_count=2, progress=False)
    build_shards(inputs, out_dir=tmp_path / "again", options=options, salt="fixed-salt", max_count=2, progress=False)
    assert _tree(tmp_path / "built") == _tree(tmp_path / "again")

    built = _check_shards(tmp_path / "built")
    assert len(built) == 5 and all(meta["format"] == "png" and min(meta["size"]) == 32 for *_, meta in built)
    assert all(image.shape == tuple(meta["size"]) and image.dtype == np.uint8 for _, image, meta in built)

    pattern = _write_synthetic_shards(tmp_path / "bench", images=20, size=32, bit_depth=16, seed=3)
    _write_synthetic_shards(tmp_path / "bench2", images=20, size=32, bit_depth=16, seed=3)
    assert pattern.endswith("shard-{000000..000001}.tar")
    assert _tree(tmp_path / "bench") == _tree(tmp_path / "bench2")
    bench = _check_shards(tmp_path / "bench")
    assert len(bench) == 20 and all(image.dtype == np.uint16 and image.shape == (32, 32) for _, image, _ in bench)
    record = {"bit_depth": 16, "format": "png", "original_size": [32, 32], "size": [32, 32]}
    assert all(meta == record for *_, meta in bench)
    assert sorted({key for key, _, _ in bench}) == [f"{i:032x}" for i in range(20)]


@pytest.mark.parametrize("name", ["abc.png", "abc.seg.png", "dir.v1/abc.json", "a/b/c.tar.gz", "noext", "dir.x/noext"])
def test_member_names_split_like_webdataset(name: str) -> None:
    match = base_plus_ext(name)
    assert split_member_name(name) == (None if match == (None, None) else match)


def test_atomic_writes_replace_whole_files_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    atomic_write_text(target, "one\n")
    atomic_write_bytes(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".file.txt.{os.getpid()}.tmp"
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"] and target.read_bytes() == b"two\n"


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_one_decoder_for_training_and_evaluation(tmp_path: Path) -> None:
    rgb = np.zeros((6, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # pure red: luma 0.299 * 200
    bmp = _encoded(Image.fromarray(rgb), "BMP")
    with pytest.raises(UnusableImage, match="unsupported_format"):
        decode_image(bmp)  # training accepts PNG / JPEG only
    assert np.array_equal(decode_image(bmp, colour=True, formats=None), rgb)  # evaluation keeps colour
    assert np.array_equal(decode_image(bmp, formats=None), np.full((6, 10), 60, dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    jpeg = _encoded(Image.fromarray(np.full((6, 10), 128, dtype=np.uint8)), "JPEG", exif=exif)
    assert decode_image(jpeg).shape == (10, 6) and decode_image(jpeg, orient=False).shape == (6, 10)
    with pytest.raises(UnusableImage, match="missing"):
        decode_image(tmp_path / "absent.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    (tmp_path / "cut.png").write_bytes(_encoded(Image.fromarray(noise), "PNG")[:200])
    with pytest.raises(UnusableImage, match="truncated"):
        decode_image(tmp_path / "cut.png")
