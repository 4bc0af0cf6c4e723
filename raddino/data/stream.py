"""Streaming WebDataset shards (``raddino shard`` output) into SSL pretraining.

Per DataLoader worker, everything below runs inside the worker::

    shard units -> tar samples (webdataset's reader) -> image member -> weighted mix of the datasets
    -> shuffle buffer -> PIL decode (uint8 / uint16) -> multi-crop + iBOT masks -> SSLBatch (collated in the worker)

``rank``, ``world_size`` and ``start_position`` are attributes of the dataset object, set in the main process and
pickled into the workers: ``torch.distributed`` is not initialised in worker processes, so nothing here asks it.

**Shard units.** With ``resampled=False`` each dataset is read in passes: pass ``k`` is a permutation of its shards
drawn from ``(seed, start_position, dataset, k)`` -- the same on every rank and worker. The passes are chained into
one endless sequence of units; the node splitter gives rank ``r`` units ``r, r + R, r + 2R, ...`` and the worker
splitter gives worker ``w`` every ``W``-th of those. So every unit of a pass is read by exactly one (rank, worker):
within a pass each sample is produced exactly once. With fewer shards than ``R * W`` readers a worker's first unit
comes from a later pass (passes overlap in time), and nobody is left without data -- no rank or worker runs dry,
nothing hangs. With ``resampled=True`` every (rank, worker) draws shards with replacement from its own generator
``(seed, start_position, dataset, rank, worker)``: no splitting, any number of shards, readers independent.

**Endless, equal steps.** Each worker's stream never ends (``num_batches`` can bound it for benchmarks and tests),
so every rank produces exactly as many batches as the trainer asks for.

**Positions.** DataLoader workers deliver batches round-robin, so worker ``w``'s ``k``-th batch is rank-local step
``w + k * W`` after the start. Sample ``j`` of step ``s`` gets the global position ``start + (s * B + j) * R + r``
(the positions :class:`~raddino.data.dataset.PositionSampler` gives rank ``r``), and its crops and masks come from
the generator of ``(seed, position)``, as in :class:`~raddino.data.dataset.SSLDataset`.

**Resume.** The shard order, resampling, mixing and shuffle generators all include ``start_position``: a resumed run
(``start_position = step * global_batch``) reads a fresh stream that does not replay the start of the run; crops and
masks stay those of ``(seed, position)``. It does not read what an uninterrupted run would have read next (that would
mean reading everything again up to the position); see docs/DATA.md, "Streaming shards into pretraining".

**Bad data** is skipped, counted per reason in :attr:`StreamWorker.skipped` and logged (the 1st, 10th, 100th, ...
occurrence per reason): a corrupt or truncated tar (samples before the damage are kept), a shard that cannot be
opened, a sample without an image member, an image PIL cannot decode. Only image members are ever decoded, by PIL;
no pickle / torch / numpy member decoder runs.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from raddino.data.augment import MultiCropAugmentation
from raddino.data.batch import SSLBatch, SSLSample, collate_ssl
from raddino.data.dataset import make_ssl_sample, sample_generator
from raddino.data.imageio import UnusableImage, decode_image
from raddino.data.masking import sample_ibot_mask
from raddino.data.shard_format import image_extension
from raddino.data.urls import expand_shard_pattern
from raddino.errors import ConfigError, RaddinoError

log = logging.getLogger(__name__)

# Seed streams (SSLDataset uses 0 for its permutations and 1 for samples; sample_generator is shared with it).
_SHARD_STREAM = 2
_MIX_STREAM = 3
_SHUFFLE_STREAM = 4
_MAX_EMPTY_SHARDS = 50  # distinct shards in a row without a sample before a worker gives up
_MAX_UNDECODABLE = 1000  # samples in a row that cannot be decoded before a worker gives up
_MIX_BLOCK = 1024  # dataset choices drawn at once
_SHUFFLE_INITIAL = 100  # samples buffered before the first one leaves (webdataset's default)


@dataclass(frozen=True)
class ShardSet:
    """One dataset: its shard URLs (as :func:`~raddino.data.urls.expand_shard_pattern` gives them) and its weight."""

    urls: tuple[str, ...]
    weight: float = 1.0
    name: str = ""


@dataclass(frozen=True)
class RawSample:
    """An undecoded sample: the bytes of its image member and where it came from.

    ``unit`` is the pass (``resampled=False``) or the draw number (``resampled=True``) of the shard read.
    """

    key: str
    url: str
    dataset: int
    unit: int
    data: bytes


def shard_sets(patterns: Sequence[str], weights: Sequence[float] = ()) -> list[ShardSet]:
    """Config values -> datasets: one pattern per dataset, ``weights`` empty (equal) or one per pattern.

    Raises:
        ConfigError: naming ``data.shards`` / ``data.shard_weights`` when they are empty, unequal in length,
            negative or all zero; :class:`RaddinoError` from URL expansion (missing local shards, bad schemes).
    """
    patterns = [str(p) for p in patterns]
    if not patterns:
        raise ConfigError(
            "invalid config key 'data.shards': required when data.source=shards, e.g. "
            "\"data.shards=['/data/cxr/shard-{000000..000099}.tar']\" (quote patterns with braces)"
        )
    weights = [float(w) for w in weights] or [1.0] * len(patterns)
    if len(weights) != len(patterns):
        raise ConfigError(
            f"invalid config key 'data.shard_weights': {len(weights)} weights for {len(patterns)} shard patterns"
        )
    if min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(
            f"invalid config key 'data.shard_weights': need weights >= 0 with a positive sum, got {weights}"
        )
    return [
        ShardSet(urls=tuple(expand_shard_pattern(p)), weight=w, name=p) for p, w in zip(patterns, weights, strict=True)
    ]


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the explicit values, else the initialised process group, else the ``RANK`` /
    ``WORLD_SIZE`` environment variables (torchrun sets them), else ``(0, 1)``. Call it in the main process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        found = dist.get_rank(), dist.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        found = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        found = 0, 1
    return (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)


def split_by_node(units: Iterator[tuple[int, int]], *, rank: int, world_size: int) -> Iterator[tuple[int, int]]:
    """Node splitter: rank ``rank`` of ``world_size`` takes every ``world_size``-th unit, starting at ``rank``."""
    return itertools.islice(units, rank, None, world_size)


def split_by_worker(units: Iterator[tuple[int, int]], *, worker: int, num_workers: int) -> Iterator[tuple[int, int]]:
    """Worker splitter: DataLoader worker ``worker`` of ``num_workers`` takes every ``num_workers``-th unit."""
    return itertools.islice(units, worker, None, num_workers)


class ShardStream(IterableDataset[SSLBatch]):
    """Endless stream of :class:`SSLBatch` (B images, collated in the worker) from WebDataset shards.

    Args:
        datasets: the datasets (see :func:`shard_sets`); each sample's dataset is drawn with probability
            proportional to its weight.
        augmentation: multi-crop augmentation; ``global_size`` must be a multiple of ``patch_size``.
        patch_size, mask_prob, mask_ratio: iBOT masks, as in :class:`~raddino.data.dataset.SSLDataset`.
        seed: stream seed.
        batch_size: B, images per batch (per rank).
        rank, world_size: this process's data-parallel rank (pass them explicitly; see :func:`resolve_rank`).
        start_position: global sample position of the first sample (``step * global_batch`` when resuming).
        shuffle_buffer: samples per worker held for shuffling (0 or 1: stream order).
        resampled: draw shards with replacement (True) or read passes without repetition (False).
        num_batches: stop after this many batches on this rank (None: endless, as training wants).

    Iterating yields gray batches: global crops (G*B, 1, Hg, Wg), local crops (L*B, 1, Hl, Wl), masks
    (G*B, (Hg/patch)^2) bool and ``labels=None``.
    """

    def __init__(
        self,
        *,
        datasets: Sequence[ShardSet],
        augmentation: MultiCropAugmentation,
        patch_size: int,
        mask_prob: float,
        mask_ratio: tuple[float, float],
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        num_batches: int | None = None,
    ) -> None:
        super().__init__()
        if not datasets or any(not d.urls for d in datasets):
            raise RaddinoError("the shard stream needs at least one dataset with at least one shard")
        weights = np.array([d.weight for d in datasets], dtype=np.float64)
        if weights.min() < 0 or weights.sum() <= 0:
            raise RaddinoError(f"dataset weights must be >= 0 with a positive sum, got {weights.tolist()}")
        if batch_size <= 0:
            raise RaddinoError(f"batch size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise RaddinoError(f"invalid rank {rank} for world size {world_size}")
        if start_position < 0:
            raise RaddinoError(f"start position must be >= 0, got {start_position}")
        if shuffle_buffer < 0:
            raise RaddinoError(f"shuffle buffer must be >= 0, got {shuffle_buffer}")
        if num_batches is not None and num_batches < 1:
            raise RaddinoError(f"num_batches must be positive (or None for an endless stream), got {num_batches}")
        if patch_size <= 0 or augmentation.global_size % patch_size:
            raise RaddinoError(
                f"global crop size {augmentation.global_size} is not a multiple of the patch size {patch_size}"
            )
        self.datasets = tuple(datasets)
        self.probs = weights / weights.sum()
        self.augmentation = augmentation
        self.mask_prob = mask_prob
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        side = augmentation.global_size // patch_size
        self.grid = (side, side)
        self.seed, self.batch_size = seed, batch_size
        self.rank, self.world_size, self.start_position = rank, world_size, start_position
        self.shuffle_buffer, self.resampled, self.num_batches = shuffle_buffer, resampled, num_batches
        # Fail now, not inside a worker, if the grid cannot hold the mask ratio range.
        sample_ibot_mask(
            self.grid,
            rng=np.random.default_rng(0),
            mask_prob=1.0,
            ratio_min=self.mask_ratio[0],
            ratio_max=self.mask_ratio[1],
        )

    def worker_stream(self, worker: int = 0, num_workers: int = 1) -> StreamWorker:
        """The stream of DataLoader worker ``worker`` of ``num_workers`` (0 of 1 in the main process)."""
        return StreamWorker(self, worker=worker, num_workers=num_workers)

    def __iter__(self) -> Iterator[SSLBatch]:
        info = get_worker_info()
        if info is None:
            return self.worker_stream().batches()
        return self.worker_stream(info.id, info.num_workers).batches()


class StreamWorker:
    """The part of a :class:`ShardStream` one DataLoader worker produces; ``skipped`` counts bad data per reason."""

    def __init__(self, stream: ShardStream, *, worker: int, num_workers: int) -> None:
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise RaddinoError(f"invalid worker {worker} of {num_workers}")
        self.stream, self.worker, self.num_workers = stream, worker, num_workers
        self.skipped: Counter[str] = Counter()
        readers = stream.world_size * num_workers
        if not stream.resampled and worker == 0 and stream.rank == 0:
            for d in stream.datasets:
                if len(d.urls) < readers:
                    log.warning(
                        "%s: %d shards for %d readers (%d ranks x %d workers): passes overlap in time, so a sample can "
                        "come back before its pass is over; use at least as many shards as readers",
                        d.name or "dataset",
                        len(d.urls),
                        readers,
                        stream.world_size,
                        num_workers,
                    )

    def _skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n == 10 ** (len(str(n)) - 1):  # the 1st, 10th, 100th, ... of each reason
            log.warning("skipped %s (%s; %d so far in worker %d)", detail, reason, n, self.worker)

    def _units(self, dataset: int) -> Iterator[tuple[int, int]]:
        """(pass or draw number, shard index) of ``dataset`` read by this worker, endless."""
        s = self.stream
        n = len(s.datasets[dataset].urls)
        if s.resampled:
            rng = np.random.default_rng([s.seed, _SHARD_STREAM, s.start_position, dataset, s.rank, self.worker])
            return ((draw, int(rng.integers(n))) for draw in itertools.count())

        def passes() -> Iterator[tuple[int, int]]:
            for k in itertools.count():
                order = np.random.default_rng([s.seed, _SHARD_STREAM, s.start_position, dataset, k]).permutation(n)
                yield from ((k, int(i)) for i in order)

        mine = split_by_node(passes(), rank=s.rank, world_size=s.world_size)
        return split_by_worker(mine, worker=self.worker, num_workers=self.num_workers)

    def _read_shard(self, url: str, dataset: int, unit: int) -> Iterator[RawSample]:
        errors: list[Exception] = []

        def handler(exn: Exception) -> bool:  # webdataset's handler protocol: True = continue
            errors.append(exn)
            return True

        source: dict = {"url": url}  # webdataset's opener adds the opened "stream" to it
        try:
            for sample in wds.tarfile_samples([source], handler=handler):
                key = sample["__key__"]
                ext = image_extension(sample)
                if ext is None:
                    members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
                    self._skip("no_image", f"{url}: sample {key} has no image member (members: {members})")
                    continue
                yield RawSample(key=key, url=url, dataset=dataset, unit=unit, data=sample[ext])
        finally:  # close now, not at garbage collection; a pipe's exit status is checked here
            if (opened := source.get("stream")) is not None:
                try:
                    opened.close()
                except Exception as err:  # e.g. "pipe:aws ..." exited with an error
                    errors.append(err)
        if errors:  # webdataset reports one damage several times (member, then archive): count the shard once
            # A failed open or command (e.g. a pipe's exit status) explains the tar errors that follow from it.
            source_errors = [e for e in errors if not isinstance(e, tarfile.TarError | EOFError)]
            first = (source_errors or errors)[0]
            message = str(first.args[0]) if first.args else type(first).__name__
            reason = "unreadable_shard" if source_errors else "corrupt_shard"
            self._skip(reason, f"{url}: {type(first).__name__}: {message}")

    def _dataset_samples(self, dataset: int) -> Iterator[RawSample]:
        urls = self.stream.datasets[dataset].urls
        empty: set[int] = set()  # distinct shards read in a row without a sample
        for unit, index in self._units(dataset):
            found = 0
            for raw in self._read_shard(urls[index], dataset, unit):
                found += 1
                yield raw
            if found:
                empty.clear()
                continue
            empty.add(index)
            if len(empty) >= min(len(urls), _MAX_EMPTY_SHARDS):
                raise RaddinoError(
                    f"no readable sample in {len(empty)} distinct shard(s) read in a row from "
                    f"'{self.stream.datasets[dataset].name or urls[0]}' (e.g. {urls[index]}); skipped so far: "
                    f"{dict(self.skipped)}"
                )

    def raw_samples(self) -> Iterator[RawSample]:
        """Undecoded samples of this worker: the datasets mixed by weight, then shuffled; endless."""
        s = self.stream
        streams = [self._dataset_samples(d) for d in range(len(s.datasets))]
        if len(streams) == 1:
            mixed: Iterator[RawSample] = streams[0]
        else:
            mix_rng = np.random.default_rng([s.seed, _MIX_STREAM, s.start_position, s.rank, self.worker])
            mixed = (
                next(streams[d]) for _ in itertools.count() for d in mix_rng.choice(len(streams), _MIX_BLOCK, p=s.probs)
            )
        if s.shuffle_buffer <= 1:
            return mixed
        state = np.random.SeedSequence([s.seed, _SHUFFLE_STREAM, s.start_position, s.rank, self.worker])
        shuffle_rng = random.Random(int(state.generate_state(1)[0]))  # webdataset's shuffle takes a random.Random
        shuffle = wds.shuffle(s.shuffle_buffer, initial=min(_SHUFFLE_INITIAL, s.shuffle_buffer), rng=shuffle_rng)
        return iter(shuffle(mixed))

    def decoded(self) -> Iterator[tuple[RawSample, np.ndarray]]:
        """``(raw sample, image (H, W) uint8 | uint16)`` in stream order; undecodable images are skipped."""
        failed = 0
        for raw in self.raw_samples():
            try:
                image = decode_image(raw.data)
            except UnusableImage as err:
                self._skip(err.reason.value, f"{raw.url}: {raw.key}: {err.detail}")
                failed += 1
                if failed >= _MAX_UNDECODABLE:
                    raise RaddinoError(
                        f"{failed} samples in a row could not be decoded (last: {raw.url}: {raw.key}: {err.detail})"
                    ) from None
                continue
            failed = 0
            yield raw, image

    def batches(self) -> Iterator[SSLBatch]:
        """This worker's batches: rank-local steps ``worker, worker + W, ...`` after the start (see module doc)."""
        s = self.stream
        images = self.decoded()
        steps = (
            itertools.count()
            if s.num_batches is None
            else range(len(range(self.worker, s.num_batches, self.num_workers)))
        )
        for k in steps:
            step = self.worker + k * self.num_workers
            samples: list[SSLSample] = []
            for j in range(s.batch_size):
                _, image = next(images)
                position = s.start_position + (step * s.batch_size + j) * s.world_size + s.rank
                samples.append(
                    make_ssl_sample(
                        image,
                        None,
                        augmentation=s.augmentation,
                        grid=s.grid,
                        mask_prob=s.mask_prob,
                        mask_ratio=s.mask_ratio,
                        rng=sample_generator(s.seed, position),
                    )
                )
            yield collate_ssl(samples)


def worker_errors_as_user_errors(loader: Iterable[SSLBatch]) -> Iterator[SSLBatch]:
    """Iterate ``loader``; a :class:`RaddinoError` raised in a DataLoader worker (which the DataLoader re-raises
    with the worker's traceback in its message) is raised again with just its own one-line message."""
    try:
        yield from loader
    except RaddinoError as err:
        text = str(err).rstrip()
        if not text.startswith("Caught "):
            raise
        last = text.splitlines()[-1]  # "raddino.errors.RaddinoError: <message>"
        raise RaddinoError(last.split(": ", 1)[-1]) from None


def build_stream_loader(
    stream: ShardStream,
    *,
    num_workers: int,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader[SSLBatch]:
    """DataLoader over a :class:`ShardStream` (batches are made in the workers: ``batch_size=None``).

    Workers are persistent (the stream is iterated once); ``pin_memory`` defaults to ``torch.cuda.is_available()``.
    """
    if num_workers < 0:
        raise RaddinoError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
