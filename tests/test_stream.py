"""Streaming WebDataset shards into pretraining: URLs, decoding, bad data, splitting, mixing, seeding, end to end."""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from raddino.build import source_from_config
from raddino.cli import main
from raddino.data.augment import MultiCropAugmentation
from raddino.data.dataset import make_ssl_sample, sample_generator
from raddino.data.imageio import UnusableImage, decode_image
from raddino.data.stream import (
    ShardSet,
    ShardStream,
    build_stream_loader,
    resolve_rank,
    shard_sets,
)
from raddino.data.urls import expand_shard_pattern, s3_to_pipe
from raddino.errors import ConfigError, RaddinoError

SIDE = 32


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(seed: int, dtype=np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top + 1, size=(SIDE, SIDE), dtype=np.int64).astype(dtype)


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shard(path: Path, keys: list[str], seed: int = 0) -> Path:
    """A shard in the builder's layout: <key>.png then <key>.json per sample."""
    members = []
    for i, key in enumerate(keys):
        members += [(f"{key}.png", _png(_image(seed * 1000 + i))), (f"{key}.json", json.dumps({"i": i}).encode())]
    return _write_tar(path, members)


def _shards(root: Path, n_shards: int, per_shard: int, prefix: str = "s") -> str:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        _shard(root / f"shard-{s:06d}.tar", [f"{prefix}{s}x{i:03d}" for i in range(per_shard)], seed=s)
    return str(root / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def _augmentation(**kw) -> MultiCropAugmentation:
    return MultiCropAugmentation(global_size=28, local_size=14, n_global=2, n_local=2, **kw)


def _stream(patterns: list[str], weights: tuple[float, ...] = (), **kw) -> ShardStream:
    args = dict(
        augmentation=_augmentation(),
        patch_size=14,
        mask_prob=0.5,
        mask_ratio=(0.1, 0.5),
        seed=0,
        batch_size=3,
        shuffle_buffer=0,
        resampled=False,
    )
    args.update(kw)
    return ShardStream(datasets=shard_sets(patterns, weights), **args)


# ------------------------------------------------------------------------------------------------------------- URLs


def test_url_expansion(tmp_path):
    for s in range(3):
        (tmp_path / f"shard-{s:06d}.tar").write_bytes(b"")
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    expected = [str(tmp_path / f"shard-{s:06d}.tar") for s in range(3)]
    assert expand_shard_pattern(pattern) == expected
    assert expand_shard_pattern(str(tmp_path)) == expected  # a directory: its .tar files, sorted
    assert expand_shard_pattern(f"file://{tmp_path}/shard-000001.tar") == expected[1:2]
    assert expand_shard_pattern(f"{tmp_path}/shard-000000.tar::{tmp_path}/shard-000002.tar") == expected[::2]
    assert expand_shard_pattern("s3://bucket/cxr/shard-{0..1}.tar") == [
        "pipe:aws s3 cp s3://bucket/cxr/shard-0.tar -",
        "pipe:aws s3 cp s3://bucket/cxr/shard-1.tar -",
    ]
    assert s3_to_pipe("s3://b/a b.tar") == "pipe:aws s3 cp 's3://b/a b.tar' -"
    assert expand_shard_pattern("https://host/d/shard-{00..01}.tar") == [
        "https://host/d/shard-00.tar",
        "https://host/d/shard-01.tar",
    ]
    assert expand_shard_pattern("pipe:cat /x/shard-0.tar") == ["pipe:cat /x/shard-0.tar"]
    with pytest.raises(RaddinoError, match=r"1 of 4 shards .* not found: .*shard-000003.tar"):
        expand_shard_pattern(str(tmp_path / "shard-{000000..000003}.tar"))
    with pytest.raises(RaddinoError, match="unsupported scheme 'ftp'"):
        expand_shard_pattern("ftp://host/x.tar")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(RaddinoError, match="no .tar files"):
        expand_shard_pattern(str(tmp_path / "empty_dir"))


def test_pipe_urls_are_read(tmp_path):
    local = _shard(tmp_path / "a.tar", ["k0", "k1", "k2"])
    keys = {}
    for pattern in (str(local), f"pipe:cat {local}"):
        worker = _stream([pattern]).worker_stream()
        keys[pattern] = [raw.key for raw in itertools.islice(worker.raw_samples(), 6)]
        assert not worker.skipped
    assert keys[str(local)] == keys[f"pipe:cat {local}"] == ["k0", "k1", "k2"] * 2
    failing = _stream([f"pipe:cat {tmp_path / 'nothing.tar'} 2>/dev/null"]).worker_stream()
    with pytest.raises(RaddinoError, match="no readable sample"):
        next(failing.raw_samples())
    assert failing.skipped == Counter({"unreadable_shard": 1})  # the command's exit status, not "corrupt"


def test_config_errors_name_the_key(tmp_path):
    pattern = _shards(tmp_path, 1, 1)
    with pytest.raises(ConfigError, match="data.shards"):
        shard_sets([])
    with pytest.raises(ConfigError, match="data.shard_weights.*2 weights for 1"):
        shard_sets([pattern], [1.0, 2.0])
    with pytest.raises(ConfigError, match="data.shard_weights"):
        shard_sets([pattern], [-1.0])
    data = OmegaConf.create({"source": "shards", "shards": [pattern]})
    with pytest.raises(RaddinoError, match="streamed"):
        source_from_config(data, seed=0)


def test_resolve_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4)
    assert resolve_rank(1, 2) == (1, 2)


# --------------------------------------------------------------------------------------------------------- decoding


def test_decode_8_and_16_bit():
    eight = _image(1, np.uint8)
    sixteen = (np.arange(SIDE * SIDE, dtype=np.uint16) * 61).reshape(SIDE, SIDE)  # 1024 distinct 16-bit levels
    out8, out16 = decode_image(_png(eight)), decode_image(_png(sixteen))
    assert out8.dtype == np.uint8 and np.array_equal(out8, eight)
    assert out16.dtype == np.uint16 and np.array_equal(out16, sixteen)
    rgb = np.stack([eight, eight, eight], axis=-1)
    assert np.array_equal(decode_image(_png(rgb)), eight)  # gray stored as RGB: luma of equal channels
    with pytest.raises(UnusableImage, match="undecodable"):
        decode_image(b"not an image")
    with pytest.raises(UnusableImage, match="truncated"):
        decode_image(_png(eight)[:200])


def test_gray_png_fast_path_matches_pil_and_leaves_other_pngs_to_it():
    from raddino.data.imageio import _is_plain_gray_png, pil_to_gray
    from raddino.data.preprocess import encode_png

    def pil_decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_gray(image)

    eight, sixteen = _image(2, np.uint8), _image(3, np.uint16)
    # what the shard builder writes (encode_png) and PIL's own writer: OpenCV's decode, identical to PIL's
    for data in (encode_png(eight, compress_level=1), encode_png(sixteen, compress_level=1), _png(eight)):
        assert _is_plain_gray_png(data)
        out = decode_image(data)
        reference = pil_decode(data)
        assert out.dtype == reference.dtype and np.array_equal(out, reference)
    # modes whose gray value PIL + pil_to_gray defines (alpha, palette, transparency, colour, 1 bit): not the
    # fast path, and still decoded as before
    buffer = io.BytesIO()
    Image.fromarray(eight).save(buffer, format="PNG", transparency=7)
    others = {
        "gray + tRNS": buffer.getvalue(),
        "LA": _png(np.stack([eight, eight[::-1]], axis=-1)),
        "RGB": _png(np.stack([eight, eight[::-1], eight.T], axis=-1)),
        "P": _png_of(Image.fromarray(eight).convert("P")),
        "1": _png_of(Image.fromarray(eight > 127)),
    }
    for name, data in others.items():
        assert not _is_plain_gray_png(data), name
        assert np.array_equal(decode_image(data), pil_decode(data)), name
    assert not _is_plain_gray_png(b"not an image")


def _png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_depth_reaches_the_crops(tmp_path):
    """A 16-bit shard image arrives in the global crop with all its levels (>> 256), scaled by 1/65535."""
    side = 28
    pixels = (np.arange(side * side, dtype=np.uint16) * 83).reshape(side, side)  # 784 distinct levels
    _write_tar(tmp_path / "s.tar", [("k.png", _png(pixels)), ("k.json", b"{}")])
    identity = MultiCropAugmentation(
        global_size=side,
        local_size=14,
        n_global=1,
        n_local=0,
        global_scale=(1.0, 1.0),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        global_blur_p=(0.0,),
    )
    stream = _stream([str(tmp_path / "s.tar")], augmentation=identity, batch_size=1, num_batches=1)
    (batch,) = list(stream)
    crop = batch.global_crops[0, 0].numpy()
    np.testing.assert_allclose(crop, pixels / 65535.0, atol=1e-6)
    assert len(np.unique(crop)) == side * side > 256


# --------------------------------------------------------------------------------------------------------- bad data


def test_corrupt_tar_and_non_image_members_are_skipped_and_counted(tmp_path):
    good = [(f"g{i}.png", _png(_image(i))) for i in range(4)]
    good += [("n0.txt", b"a caption, no image"), ("bad0.png", b"\x89PNG\r\n\x1a\n garbage")]  # bad ones last
    _write_tar(tmp_path / "shard-000000.tar", good)
    full = _shard(tmp_path / "full.tar", [f"t{i}" for i in range(4)], seed=7).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = tar.getmember("t2.png").offset_data + 100  # inside the third image
    (tmp_path / "shard-000001.tar").write_bytes(full[:cut])
    stream = _stream([str(tmp_path / "shard-{000000..000001}.tar")])
    worker = stream.worker_stream()
    per_pass: dict[int, list[str]] = {0: [], 1: []}
    for raw, image in worker.decoded():
        if raw.unit == 2:  # the first sample of pass 2: passes 0 and 1 are fully read
            break
        assert image.shape == (SIDE, SIDE)
        per_pass[raw.unit].append(raw.key)
    for keys in per_pass.values():
        assert sorted(keys) == ["g0", "g1", "g2", "g3", "t0", "t1"]
    assert worker.skipped == Counter({"no_image": 2, "undecodable": 2, "corrupt_shard": 2})
    # Through worker processes too: no crash, full batches.
    loader = build_stream_loader(_stream([str(tmp_path)], num_batches=4), num_workers=2)
    assert [b.batch_size for b in loader] == [3, 3, 3, 3]


def test_unreadable_data_is_a_clear_error(tmp_path):
    _write_tar(tmp_path / "a.tar", [("k.txt", b"x")])
    with pytest.raises(RaddinoError, match="no readable sample"):
        next(iter(_stream([str(tmp_path / "a.tar")])))


# ------------------------------------------------------------------------------------------------- splitting, steps


@pytest.mark.timeout(120)
def test_two_ranks_two_workers_three_shards(tmp_path):
    pattern = _shards(tmp_path, n_shards=3, per_shard=5)
    everything = sorted(f"s{s}x{i:03d}" for s in range(3) for i in range(5))
    # Each of the 4 readers reads every 4th shard of the chained passes: 3 shards each = passes 0..3 exactly.
    seen: dict[int, list[str]] = {p: [] for p in range(4)}
    for rank in range(2):
        stream = _stream([pattern], rank=rank, world_size=2)
        for worker in range(2):
            for raw in itertools.islice(stream.worker_stream(worker, 2).raw_samples(), 15):
                seen[raw.unit].append(raw.key)
    for keys in seen.values():
        assert sorted(keys) == everything  # every sample of a pass exactly once, across ranks and workers
    # Real worker processes: equal step counts per rank, finite and endless, no hang (3 shards < 4 readers).
    for resampled in (False, True):
        counts = []
        for rank in range(2):
            loader = build_stream_loader(
                _stream([pattern], rank=rank, world_size=2, resampled=resampled, num_batches=5), num_workers=2
            )
            counts.append(sum(1 for _ in loader))
        assert counts == [5, 5]
    for rank in range(2):
        endless = build_stream_loader(_stream([pattern], rank=rank, world_size=2), num_workers=2)
        assert len(list(itertools.islice(endless, 7))) == 7


def test_positions_and_augmentation_seeding(tmp_path):
    """Worker w of W, rank r of R: batch k holds global positions start + ((w + kW) B + j) R + r."""
    pattern = _shards(tmp_path, n_shards=2, per_shard=4)
    start, rank, world, worker, workers = 60, 1, 2, 1, 2
    kwargs = dict(rank=rank, world_size=world, start_position=start)
    batches = _stream([pattern], **kwargs).worker_stream(worker, workers).batches()
    images = _stream([pattern], **kwargs).worker_stream(worker, workers).decoded()
    stream = _stream([pattern])
    for k in range(2):
        batch = next(batches)
        for j in range(3):
            _, image = next(images)
            position = start + ((worker + k * workers) * 3 + j) * world + rank
            ref = make_ssl_sample(
                image,
                None,
                augmentation=stream.augmentation,
                grid=stream.grid,
                mask_prob=0.5,
                mask_ratio=(0.1, 0.5),
                rng=sample_generator(0, position),
            )
            torch.testing.assert_close(batch.global_crops[j::3], ref.global_crops, rtol=0, atol=0)
            torch.testing.assert_close(batch.local_crops[j::3], ref.local_crops, rtol=0, atol=0)
            assert torch.equal(batch.masks[j::3], ref.masks)


# ---------------------------------------------------------------------------------------------- mixing and seeding


def test_weighted_mixing_proportions(tmp_path):
    a = _shards(tmp_path / "a", n_shards=2, per_shard=5, prefix="a")
    b = _shards(tmp_path / "b", n_shards=1, per_shard=5, prefix="b")
    stream = _stream([a, b], (3.0, 1.0), resampled=True, shuffle_buffer=50)
    datasets = [raw.dataset for raw in itertools.islice(stream.worker_stream().raw_samples(), 2000)]
    assert abs(datasets.count(0) / len(datasets) - 0.75) < 0.04  # binomial sd 0.01
    only_a = _stream([a, b], (1.0, 0.0), resampled=True)
    assert {raw.dataset for raw in itertools.islice(only_a.worker_stream().raw_samples(), 100)} == {0}


def test_same_seed_same_stream_resume_gives_a_fresh_one(tmp_path):
    pattern = _shards(tmp_path, n_shards=6, per_shard=4)

    def keys(stream: ShardStream, n: int) -> list[str]:
        return [raw.key for raw in itertools.islice(stream.worker_stream().raw_samples(), n)]

    for resampled in (True, False):
        kw = dict(resampled=resampled, shuffle_buffer=8)
        first, again = _stream([pattern], **kw), _stream([pattern], **kw)
        assert keys(first, 48) == keys(again, 48)
        for x, y in zip(itertools.islice(first, 2), itertools.islice(again, 2), strict=True):
            assert torch.equal(x.global_crops, y.global_crops) and torch.equal(x.masks, y.masks)
        assert keys(_stream([pattern], seed=1, **kw), 48) != keys(first, 48)
        # Resuming at position 12 (4 steps of 3): a fresh stream, neither the run's start nor its continuation.
        resumed = keys(_stream([pattern], start_position=12, **kw), 24)
        original = keys(first, 48)
        assert resumed != original[:24] and resumed != original[12:36]


# -------------------------------------------------------------------------------------------------------- end to end


SMALL = [
    "model.img_size=28",
    "crops.global_size=28",
    "crops.local_size=14",
    "crops.n_local=2",
    "head.out_dim=256",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "train.steps_per_epoch=4",
    "train.epochs=2",
    "optim.warmup_epochs=1",
    "teacher.temp_warmup_epochs=1",
    "train.progress=false",
]


def test_pretrain_on_shards_end_to_end(tmp_path, capsys):
    pattern = _shards(tmp_path / "shards", n_shards=3, per_shard=4)
    out = tmp_path / "run"
    args = ["pretrain", "--config", "tiny_cpu", *SMALL, "data.source=shards", f"train.output_dir={out}"]
    assert main([*args, f"data.shards=['{pattern}']", "train.max_steps=2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert main([*args, "train.resume=none", "train.max_steps=1"]) == 2  # no data.shards: a user error
    missing = str(tmp_path / "nowhere" / "shard-000000.tar")
    assert main([*args, "train.resume=none", f"data.shards=['{missing}']", "train.max_steps=1"]) == 2
    # A broken dataset found inside a worker process: a one-line error, no worker traceback.
    broken = str(_write_tar(tmp_path / "broken.tar", [("k.txt", b"x")]))
    capsys.readouterr()
    worker_args = ["train.resume=none", "data.num_workers=1", f"data.shards=['{broken}']", "train.max_steps=1"]
    assert main([*args, *worker_args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("raddino pretrain: error: no readable sample in 1 distinct shard(s)")


def test_shard_set_weights_validation():
    with pytest.raises(RaddinoError, match="at least one shard"):
        ShardStream(
            datasets=[ShardSet(urls=())],
            augmentation=_augmentation(),
            patch_size=14,
            mask_prob=0.5,
            mask_ratio=(0.1, 0.5),
            seed=0,
            batch_size=2,
        )


def test_bench_loader_command(capsys, tmp_path: Path):
    import argparse
    import json

    from raddino.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    tiny = "--size 32 --images 4 --batches 2 --batch-size 2 --workers 0 --global-size 28 --local-size 14 --n-local 2"
    args = parser.parse_args(["bench", "loader", *tiny.split(), "--json", str(tmp_path / "loader.json")])
    assert args.func(args) == 0
    record = json.loads((tmp_path / "loader.json").read_text())
    assert record["crops"]["n_local"] == 2 and set(record["data"]) == {"8-bit 32 px", "16-bit 32 px"}
    lines = capsys.readouterr().out.splitlines()
    ours = [line for line in lines if line.split()[:1] in (["8-bit"], ["16-bit"])]
    rows = [line.split() for line in ours if "alone" not in line and "side by side" not in line]
    assert [(r[0], r[3]) for r in rows] == [("8-bit", "0"), ("16-bit", "0")]
    assert all(float(r[4]) > 0 for r in rows)
    # raddino's and DINOv2's pipelines side by side, with their ratio
    both = [
        re.search(r"raddino \(pyramid\) ([\d.]+) images/s, DINOv2 ([\d.]+) images/s, ratio ([\d.]+)x", line)
        for line in ours
    ]
    both = [match for match in both if match]
    assert len(both) == 2
    for match in both:
        raddino, dinov2, ratio = (float(value) for value in match.groups())
        assert raddino > 0 and dinov2 > 0 and ratio == pytest.approx(raddino / dinov2, rel=0.05, abs=0.06)
    # the JSON holds the numbers the lines print
    printed = {(r[0] + " " + r[1] + " " + r[2]): float(r[4]) for r in rows}
    for label, data in record["data"].items():
        assert f"{data['stream']['0']['images_per_s']:.1f}" == f"{printed[label]:.1f}"
        side = data["side_by_side"]
        assert side["ratio"] == pytest.approx(side["raddino"] / side["dinov2"])
