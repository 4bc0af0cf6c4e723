"""``raddino bench train``: step time, its split, peak memory and model-FLOP utilisation of the real trainer.

The components come from :func:`raddino.train.build_training` (model, FSDP2/AC/compile as configured, optimizer,
loader); the step is the trainer's step cut into timed phases: data wait (next batch, copy to the device), teacher
forward (:meth:`~raddino.ssl.SSLMetaArch.teacher_targets`), student forward + backward
(:meth:`~raddino.ssl.SSLMetaArch.student_loss`), optimizer (clip + AdamW) and EMA. On CUDA each phase is timed with
CUDA events and the step ends with one synchronisation; on the CPU with ``perf_counter``. MFU = model FLOPs per
step (:mod:`raddino.flops`) / step time / peak FLOP/s, the peak given (``--peak-tflops``) or measured with a
large matmul in the step's compute dtype.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from omegaconf import DictConfig

from raddino.flops import ssl_step_flops
from raddino.optim import apply_schedule, clip_grad_norm
from raddino.parallel import sharded_modules
from raddino.train import build_training, compute_dtype

PHASES = ("data", "teacher_forward", "student_forward_backward", "optimizer", "ema")


class PhaseTimer:
    """Times named phases of one step: CUDA events on a GPU (no sync inside the step), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[str, object, object]] = []
        self._cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            tick = time.perf_counter()
            yield
            self._cpu[name] = self._cpu.get(name, 0.0) + time.perf_counter() - tick

    def collect(self) -> dict[str, float]:
        """Seconds per phase of the step just timed (synchronises the GPU once), then reset."""
        if self.cuda:
            torch.cuda.synchronize()
            out: dict[str, float] = {}
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
            self._events.clear()
            return out
        out, self._cpu = self._cpu, {}
        return out


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput (TFLOP/s) of ``device`` in ``dtype``: a practical peak for MFU when none is given."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 20 if device.type == "cuda" else 5
    tick = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - tick) / 1e12


@dataclass
class TrainBenchResult:
    device: str
    torch: str
    arch: str
    batch: int
    crops: str
    compute_dtype: str
    fsdp: bool
    compile: bool
    activation_checkpointing: int
    steps: int
    pack_crops: bool
    phase_s: dict[str, float] = field(default_factory=dict)  # median seconds per phase
    step_s: float = 0.0
    images_per_s: float = 0.0
    peak_memory_gib: float | None = None
    flops_per_step: int = 0
    achieved_tflops: float = 0.0
    peak_tflops: float = 0.0
    peak_source: str = ""
    mfu: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        mem = "n/a (CPU)" if self.peak_memory_gib is None else f"{self.peak_memory_gib:.2f} GiB"
        lines = [
            f"raddino bench train: ViT-{self.arch}, batch {self.batch}, crops {self.crops}, {self.compute_dtype}, "
            f"fsdp={self.fsdp}, compile={self.compile}, ac={self.activation_checkpointing}, "
            f"pack={self.pack_crops}, {self.device}, torch {self.torch}, {self.steps} timed steps",
            "",
            "| measure | value |",
            "|---|---|",
            *(f"| {name} | {self.phase_s.get(name, 0.0) * 1000:.1f} ms |" for name in PHASES),
            f"| step | {self.step_s * 1000:.1f} ms |",
            f"| images/s | {self.images_per_s:.1f} |",
            f"| peak memory | {mem} |",
            f"| model FLOPs / step | {self.flops_per_step / 1e12:.3f} TFLOP |",
            f"| achieved | {self.achieved_tflops:.2f} TFLOP/s |",
            f"| peak ({self.peak_source}) | {self.peak_tflops:.2f} TFLOP/s |",
            f"| MFU | {100 * self.mfu:.1f} % |",
        ]
        return "\n".join(lines)


def run_train_bench(cfg: DictConfig, *, steps: int, warmup: int, peak_tflops: float | None) -> TrainBenchResult:
    """Warm up ``warmup`` steps, then time ``steps`` steps of the configured training (see the module docstring)."""
    t = build_training(cfg)
    model, device = t.model, t.device
    batches = iter(t.make_loader(start_position=0))
    sched = t.schedules.at(t.derived.warmup_steps)  # a representative lr / wd / temperature
    apply_schedule(t.optimizer, lr=sched.lr, weight_decay=sched.weight_decay, last_layer_lr=sched.lr)
    params = [p for p in model.student.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=t.autocast_dtype) if t.autocast_dtype else contextlib.nullcontext()
    timer = PhaseTimer(device)
    per_step: list[dict[str, float]] = []
    masked: list[int] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for i in range(warmup + steps):
        with timer.phase("data"):
            batch = next(batches).to(device, non_blocking=True).normalized()
        with autocast:
            with timer.phase("teacher_forward"):
                targets = model.teacher_targets(batch, teacher_temp=sched.teacher_temp)
            with timer.phase("student_forward_backward"):
                out = model.student_loss(batch, targets)
                out.loss.backward()
        with timer.phase("optimizer"):
            clip_grad_norm(params, t.clip_grad)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
        with timer.phase("ema"):
            model.update_teacher(sched.momentum)
        phases = timer.collect()
        if i >= warmup:
            per_step.append(phases)
            masked.append(int(batch.masks.sum()))
    c = cfg.crops
    flops = ssl_step_flops(
        model,
        batch_size=t.derived.micro_batch,
        global_size=c.global_size,
        local_size=c.local_size,
        n_global=c.n_global,
        n_local=c.n_local,
        masked_patches=round(statistics.mean(masked)),
    ).total
    step_s = statistics.median(sum(p.values()) for p in per_step)
    dtype = compute_dtype(cfg.train.precision, device) or torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    if peak_tflops is None:
        peak, source = measure_peak_tflops(device, dtype), f"measured {dtype_name} matmul"
    else:
        peak, source = peak_tflops, "given"
    achieved = flops / step_s / 1e12
    return TrainBenchResult(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        arch=f"{cfg.model.arch}/{cfg.model.patch_size}",
        batch=t.derived.micro_batch,
        crops=f"{c.n_global}x{c.global_size} + {c.n_local}x{c.local_size}",
        compute_dtype=dtype_name,
        fsdp=bool(sharded_modules(model)),
        compile=bool(cfg.parallel.compile),
        activation_checkpointing=int(cfg.parallel.activation_checkpointing),
        steps=steps,
        pack_crops=bool(cfg.model.pack_crops),
        phase_s={name: statistics.median(p.get(name, 0.0) for p in per_step) for name in PHASES},
        step_s=step_s,
        images_per_s=t.derived.micro_batch / step_s,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        flops_per_step=flops,
        achieved_tflops=achieved,
        peak_tflops=peak,
        peak_source=source,
        mfu=achieved / peak,
    )
