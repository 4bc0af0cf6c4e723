"""`raddino shard`: the builder on real radiographs (mixed formats and PIL modes), skip accounting, reproducible
bytes, refusal to overwrite, CSV metadata, 16-bit round trip, shard rolling and webdataset compatibility."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raddino.cli import main as cli_main
from raddino.data.imageio import read_image
from raddino.data.preprocess import PreprocessOptions, resized_shape
from raddino.data.shard import build_shards, make_key, read_key_map_salt
from raddino.data.shard_format import TAR_MTIME, ShardWriter
from raddino.data.shard_inputs import InputSet, SourceItem, collect_inputs, identifying_columns
from raddino.errors import RaddinoError

KEY = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def sample_dir(shared_data: Path) -> Path:
    path = shared_data / "cxr-covid-sample"
    if not (path / "images").is_dir():
        pytest.skip(f"{path}/images not found")
    return path


@pytest.fixture
def subset(sample_dir: Path) -> list[Path]:
    """The two smallest images of every (format, PIL mode) in the sample: covers JPEG L/RGB, PNG L/RGB/RGBA/1."""
    groups: dict[tuple[str, str], list[tuple[int, Path]]] = defaultdict(list)
    for path in sorted((sample_dir / "images").iterdir()):
        with Image.open(path) as image:
            groups[(image.format, image.mode)].append((image.size[0] * image.size[1], path))
    chosen = [path for members in groups.values() for _, path in sorted(members)[:2]]
    modes = {mode for _, mode in groups}
    assert {"L", "RGB", "RGBA", "1"} <= modes, f"sample lost some PIL modes: {modes}"
    return sorted(chosen)


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {"png": bytes, "json": bytes}} over all shards, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_key_map(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#raddino-keymap salt=")
    return list(csv.DictReader(lines[1:]))


def test_builder_on_real_sample_counts_and_decodes(tmp_path: Path, subset: list[Path]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    jpeg = next(p for p in subset if p.suffix in (".jpg", ".jpeg"))
    (bad / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (bad / "garbage.png").write_bytes(bytes(range(256)) * 4)
    (bad / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a PNG" * 8)
    (bad / "notes").write_text("not an image\n")
    entries = [str(p) for p in subset] + [str(p) for p in sorted(bad.iterdir())]
    entries += [str(tmp_path / "does-not-exist.png"), str(subset[0])]  # a missing file and a duplicate
    listing = tmp_path / "files.txt"
    listing.write_text("# inputs\n" + "\n".join(entries) + "\n")

    inputs = collect_inputs(listing)
    assert len(inputs.items) == len(entries)
    out = tmp_path / "out"
    options = PreprocessOptions(size=96)
    summary = build_shards(inputs, out_dir=out, options=options, salt="test-salt", workers=2, progress=False)

    expected_skips = {
        "duplicate": 1,
        "empty": 1,
        "missing": 1,
        "truncated": 1,
        "undecodable": 1,
        "unsupported_format": 2,
    }
    assert summary.skipped == expected_skips
    assert summary.written == len(subset)
    assert summary.written + sum(summary.skipped.values()) == summary.inputs == len(entries)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == len(entries)
    assert manifest["counts"]["written"] == len(subset)
    assert manifest["counts"]["skipped_by_reason"] == expected_skips
    assert sum(s["samples"] for s in manifest["shards"]) == len(subset)

    samples = read_shards(out)
    assert len(samples) == len(subset)
    for key, members in samples.items():
        assert KEY.match(key) and "." not in key
        assert set(members) == {"png", "json"}
        image = Image.open(io.BytesIO(members["png"]))
        image.load()
        record = json.loads(members["json"])
        assert image.mode == "L" and min(image.size) == 96
        assert record["size"] == [image.size[1], image.size[0]] and record["bit_depth"] == 8
        pixels = np.asarray(image)
        assert pixels.min() == 0 and pixels.max() == 255  # per-image min-max scaling of the stored image

    rows = read_key_map(summary.key_map_path)
    assert [r["source"] for r in rows] == sorted(entries)
    written = {r["key"] for r in rows if r["status"] == "written"}
    assert written == set(samples)
    assert {r["status"] for r in rows} - {"written"} == {f"skipped:{reason}" for reason in expected_skips}
    # No source path or file name anywhere in the shard directory.
    blobs = [p.read_bytes() for p in out.iterdir()]
    for path in subset:
        assert not any(path.name.encode() in blob for blob in blobs), path.name


def test_builder_on_the_whole_sample_directory(tmp_path: Path, sample_dir: Path) -> None:
    """All 312 real images (JPEG and PNG in modes L, RGB, RGBA, 1, of sizes 249..4280 px), two worker processes."""
    inputs = collect_inputs(sample_dir / "images")
    out = tmp_path / "out"
    options = PreprocessOptions(size=64)
    summary = build_shards(inputs, out_dir=out, options=options, workers=2, max_count=100, progress=False)
    assert summary.written + sum(summary.skipped.values()) == summary.inputs == len(inputs.items)
    assert inputs.ignored_files == 0 and summary.skipped == {}  # every file of the sample is a usable image
    assert [s.samples for s in summary.shards] == [100, 100, 100, summary.inputs - 300]
    samples = read_shards(out)
    assert len(samples) == summary.written
    formats = set()
    for key, members in samples.items():
        assert KEY.match(key)
        image = Image.open(io.BytesIO(members["png"]))
        image.load()
        assert image.mode == "L" and min(image.size) == 64
        formats.add(json.loads(members["json"])["format"])
    assert formats == {"png", "jpeg"}


def test_gray_conversion_matches_independent_luma(subset: list[Path]) -> None:
    weights = np.array([0.299, 0.587, 0.114])
    for path in subset:
        with Image.open(path) as image:
            mode = image.mode
            rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        expected = (rgba[..., :3] @ weights) * rgba[..., 3] / 255.0
        got = read_image(path).pixels
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.abs(got.astype(np.float64) - expected).max() <= 1.0, (path.name, mode)
        if mode == "1":
            assert set(np.unique(got)) <= {0, 255}


def test_reproducible_bytes_and_refusal_to_overwrite(tmp_path: Path, subset: list[Path]) -> None:
    inputs = InputSet([SourceItem(p.name, p) for p in subset[:6]], kind="list")
    out = tmp_path / "out"
    options = PreprocessOptions(size=64)
    first = build_shards(inputs, out_dir=out, options=options, workers=1, max_count=4, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    key_map = first.key_map_path.read_bytes()
    assert sorted(before) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]

    with pytest.raises(RaddinoError, match="not empty"):
        build_shards(inputs, out_dir=out, options=options, progress=False)
    # Same inputs and options, other worker count: the salt comes back from the key map, the bytes are identical.
    build_shards(inputs, out_dir=out, options=options, workers=2, max_count=4, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert first.key_map_path.read_bytes() == key_map
    salt = read_key_map_salt(first.key_map_path)
    assert len(salt) == 32 and salt.encode() not in before["manifest.json"]
    assert first.key_map_path.parent == out.parent  # beside the shard directory, not inside
    with tarfile.open(out / "shard-000000.tar") as tar:
        member = tar.getmembers()[0]
        assert member.mtime == TAR_MTIME and member.uname == "" and member.uid == 0
    # A fresh output directory next to an existing key map is refused too (the key map is the only source->key link).
    with pytest.raises(RaddinoError, match="key map"):
        build_shards(inputs, out_dir=tmp_path / "other", key_map=first.key_map_path, options=options, progress=False)


def test_cli_csv_carries_columns_and_refuses_identifying_ones(tmp_path: Path, sample_dir: Path) -> None:
    rows = list(csv.DictReader((sample_dir / "metadata.csv").open(newline="")))
    present = [r for r in rows if (sample_dir / "images" / r["filename"]).is_file()]
    present.sort(key=lambda r: (sample_dir / "images" / r["filename"]).stat().st_size)
    chosen = present[:4] + [dict(present[0], filename="missing-file.png")]
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filename", "view", "sex", "finding", "Patientid"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in chosen)
    out = tmp_path / "out"
    base = ["shard", str(table), "--out", str(out), "--path-column", "filename", "--root", str(sample_dir / "images")]
    base += ["--size", "48", "--workers", "1", "--salt", "cli-salt-123"]
    assert cli_main([*base, "--carry", "view,sex,Patientid"]) == 2  # identifying column refused
    assert not out.exists()
    assert cli_main([*base, "--carry", "view,sex,finding"]) == 0
    samples = read_shards(out)
    assert len(samples) == 4
    keys = {make_key(r["filename"], "cli-salt-123"): r for r in chosen[:4]}
    for key, members in samples.items():
        meta = json.loads(members["json"])["meta"]
        expected = keys[key]
        assert meta == {"view": expected["view"], "sex": expected["sex"], "finding": expected["finding"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_by_reason"] == {"missing": 1}
    assert manifest["options"]["carried_columns"] == ["finding", "sex", "view"]
    assert cli_main(base) == 2  # existing output without --overwrite


def test_16bit_png_round_trip_keeps_depth(tmp_path: Path) -> None:
    values = (np.arange(120 * 160, dtype=np.int64) * 3 % 65536).astype(np.uint16).reshape(120, 160)
    values[0, 0], values[0, 1] = 0, 65535  # full range: min-max scaling is then the identity
    source = tmp_path / "src16.png"
    Image.fromarray(values).save(source)
    decoded = read_image(source)
    assert decoded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(decoded.pixels, values)

    inputs = InputSet([SourceItem("src16.png", source)], kind="list")
    levels = {}
    for depth in (16, 8):
        out = tmp_path / f"out{depth}"
        build_shards(inputs, out_dir=out, options=PreprocessOptions(size=0, bit_depth=depth), progress=False)
        (members,) = read_shards(out).values()
        stored = np.asarray(Image.open(io.BytesIO(members["png"])))
        levels[depth] = len(np.unique(stored))
        if depth == 16:
            assert stored.dtype == np.uint16
            np.testing.assert_array_equal(stored, values)
        else:
            np.testing.assert_allclose(stored, np.rint(values / 65535 * 255), atol=1)
    assert levels[16] > 256 >= levels[8]


def _png_row_filters(data: bytes) -> set[int]:
    """The filter-type byte of every row of a non-interlaced grayscale PNG (0 none, 1 sub, 2 up, 3 avg, 4 Paeth)."""
    import struct
    import zlib

    width, height, depth = struct.unpack(">IIB", data[16:25])
    assert data[25] == 0 and data[28] == 0  # grayscale, not interlaced
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * depth // 8
    assert len(raw) == stride * height
    return {raw[row * stride] for row in range(height)}


def test_stored_pngs_use_the_up_filter_at_the_level_asked() -> None:
    # The builder writes every row with PNG's "up" filter (cheap to undo when training decodes it again and again);
    # the pixels read back exactly with PIL and OpenCV, at either depth; the zlib level is the one asked for.
    import cv2

    from raddino.data.preprocess import encode_png

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(-3, 4, size=(96, 80)), axis=0) + np.arange(80)  # radiograph-like gradients
    eight = np.clip(smooth + 128, 0, 255).astype(np.uint8)
    sixteen = (np.clip(smooth + 128, 0, 255) * 257 + rng.integers(0, 200, size=smooth.shape)).astype(np.uint16)
    for pixels in (eight, sixteen):
        data = encode_png(pixels, compress_level=3)
        assert _png_row_filters(data) == {2}
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image).astype(pixels.dtype), pixels)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded.dtype == pixels.dtype
        np.testing.assert_array_equal(decoded, pixels)
        sizes = [len(encode_png(pixels, compress_level=level)) for level in (0, 9)]
        assert sizes[0] > pixels.nbytes > sizes[1]  # level 0 stores, level 9 compresses
    with pytest.raises(AssertionError, match="uint8 / uint16"):
        encode_png(eight.astype(np.float32), compress_level=3)


def test_shard_cli_defaults_are_the_preprocess_defaults() -> None:
    from raddino.cli import build_parser

    args = build_parser().parse_args(["shard", "in", "--out", "out"])
    defaults = PreprocessOptions()
    assert args.png_compress_level == defaults.png_compress_level
    assert args.size == defaults.size and args.resample == defaults.resample and args.bit_depth == defaults.bit_depth


def test_shard_rolling_manifest_hashes_and_webdataset_reader(tmp_path: Path) -> None:
    import webdataset

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(12):
        folder = src / "sub" if i % 2 else src
        Image.fromarray(rng.integers(0, 256, (40 + i, 50), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    (src / "README.txt").write_text("ignored")
    out = tmp_path / "out"
    inputs = collect_inputs(src)
    assert inputs.ignored_files == 1 and len(inputs.items) == 12
    summary = build_shards(inputs, out_dir=out, options=PreprocessOptions(size=32), max_count=5, progress=False)
    assert [s.samples for s in summary.shards] == [5, 5, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    dataset = webdataset.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False, empty_check=False)
    seen = [(sample["__key__"], sorted(k for k in sample if not k.startswith("__"))) for sample in dataset]
    assert len(seen) == 12 and all(exts == ["json", "png"] for _, exts in seen)
    assert {key for key, _ in seen} == set(read_shards(out))
    # A byte budget smaller than one sample puts every sample in its own shard.
    tiny = build_shards(
        inputs, out_dir=tmp_path / "tiny", options=PreprocessOptions(size=32), max_bytes=1000, progress=False
    )
    assert [s.samples for s in tiny.shards] == [1] * 12


def test_scaling_percentile_and_constant_images(tmp_path: Path) -> None:
    image = (np.arange(100 * 100) % 100).astype(np.uint16).reshape(100, 100)
    image[0, 0] = 60000  # one outlier: min-max would squash everything else into a few levels
    source = tmp_path / "outlier.png"
    Image.fromarray(image).save(source)
    Image.fromarray(np.full((30, 30), 77, dtype=np.uint8)).save(tmp_path / "flat.png")
    inputs = InputSet([SourceItem(n, tmp_path / n) for n in ("flat.png", "outlier.png")], kind="list")
    outputs = {}
    for scaling in ("minmax", "percentile"):
        out = tmp_path / scaling
        options = PreprocessOptions(size=0, scaling=scaling, percentiles=(1.0, 99.0))
        summary = build_shards(inputs, out_dir=out, options=options, progress=False)
        assert summary.skipped == {"constant": 1}
        (members,) = read_shards(out).values()
        outputs[scaling] = np.asarray(Image.open(io.BytesIO(members["png"]))).astype(np.float64)
    low, high = np.percentile(image.astype(np.float64), [1.0, 99.0])
    expected = np.rint(np.clip((image - low) / (high - low), 0, 1) * 255)
    np.testing.assert_allclose(outputs["percentile"], expected, atol=1)
    np.testing.assert_allclose(outputs["minmax"], np.rint(image / 60000 * 255), atol=1)


def test_keys_shapes_and_column_guard() -> None:
    key = make_key("a/b.dcm", "salt-one")
    assert KEY.match(key) and key == make_key("a/b.dcm", "salt-one")
    assert key != make_key("a/b.dcm", "salt-two") and key != make_key("a/c.dcm", "salt-one")
    assert resized_shape(1000, 500, size=518, upscale=True) == (1036, 518)
    assert resized_shape(300, 400, size=518, upscale=True) == (518, 691)
    assert resized_shape(300, 400, size=518, upscale=False) == (300, 400)
    assert resized_shape(300, 400, size=0, upscale=True) == (300, 400)
    columns = ["Patientid", "PatientID", "patient_name", "StudyDate", "filename", "view", "sex", "age", "covid"]
    assert identifying_columns(columns) == ["Patientid", "PatientID", "patient_name", "StudyDate", "filename"]


def test_shards_appear_only_when_complete(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_count=2, max_bytes=10**9)
    writer.add("k1", [("png", b"x" * 10), ("json", b"{}")])
    assert [p.name for p in tmp_path.iterdir()] == [f".shard-000000.tar.{os.getpid()}.tmp"]  # not a shard yet
    writer.add("k2", [("png", b"y"), ("json", b"{}")])
    writer.add("k3", [("png", b"z"), ("json", b"{}")])  # max_count reached: shard 0 is finished first
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".shard-000001.tar.{os.getpid()}.tmp", "shard-000000.tar"]
    writer.abort()  # an interrupted run drops the unfinished shard and keeps the complete one
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames() == ["k1.png", "k1.json", "k2.png", "k2.json"]
