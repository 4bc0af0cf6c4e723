"""Check the Performance issue's goals against the files a ``benchmarks/gpu_perf.sh`` device call wrote.

    python benchmarks/gpu_summary.py OUT      # -> OUT/summary.json, OUT/summary.md (also printed)

Reads, each optional (a missing or failed stage makes its goals "not measured", never a pass):
``train_vitb*.json`` (``raddino bench train``, ViT-B/14 eager / fused AdamW / compiled / packed crops; the fastest
is raddino's number), ``peers.json`` (``benchmarks/peers.py``), ``train_vitl_ac.json`` (ViT-L/14 with activation
checkpointing) and ``loader.json`` (``raddino bench loader --json``, 8-bit 512-px PNG).

Meta's trainer counts as the better of its two runs here (``dinov2``: its modules as shipped, whose attention falls
back to an explicit softmax without xFormers; ``dinov2-sdpa``: the same with torch's fused attention standing in for
xFormers' kernel): the fastest and the least memory of the two, so the comparison never flatters raddino.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
FITS_BYTES = 80e9  # "fits in 80 GB": an 80 GB H100 / A100


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    measured: str
    met: bool | None  # None: not measured


def _read(out: Path, name: str) -> dict | None:
    path = out / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _ok_peers(peers: dict | None, names: tuple[str, ...]) -> list[dict]:
    if not peers:
        return []
    return [p for n, p in peers.get("peers", {}).items() if n in names and p.get("status") == "ok"]


def check_goals(out: Path) -> list[Goal]:
    """The goals of the Performance issue, each met / not met / not measured (``met=None``)."""
    # variant name (the file's suffix: eager, fused, compile, packed) -> record; the fastest variant is raddino's number
    trains = {
        p.stem.removeprefix("train_vitb").lstrip("_") or "eager": _read(out, p.name)
        for p in sorted(out.glob("train_vitb*.json"))
    }
    trains = {name: t for name, t in trains.items() if t}
    variant = max(trains, key=lambda name: trains[name]["images_per_s"]) if trains else None
    ours = trains[variant] if variant else None
    peers = _read(out, "peers.json")
    official = _ok_peers(peers, ("dinov2", "dinov2-sdpa"))
    lightly = _ok_peers(peers, ("lightly",))
    large = _read(out, "train_vitl_ac.json")
    loader = _read(out, "loader.json")
    goals = []

    def ratio_goal(name: str, target: float, mine: float | None, theirs: float | None, unit: str, higher: bool):
        if mine is None or theirs is None or theirs <= 0:
            goals.append(Goal(name, f"{'≥' if higher else '≤'} {target}x", "not measured", None))
            return
        r = mine / theirs
        goals.append(
            Goal(
                name,
                f"{'≥' if higher else '≤'} {target}x",
                f"{r:.2f}x ({mine:.1f} vs {theirs:.1f} {unit})",
                r >= target if higher else r <= target,
            )
        )

    if ours is None:
        goals.append(Goal("MFU, ViT-B/14 batch 64 bf16", "≥ 50 %", "not measured", None))
    else:
        measured = f"{100 * ours['mfu']:.1f} % ({variant})"
        goals.append(Goal("MFU, ViT-B/14 batch 64 bf16", "≥ 50 %", measured, ours["mfu"] >= 0.5))
    ours_ips = ours["images_per_s"] if ours else None
    ratio_goal(
        "images/s vs Meta's DINOv2 code",
        1.3,
        ours_ips,
        max((p["images_per_s"] for p in official), default=None),
        "images/s",
        True,
    )
    ratio_goal(
        "images/s vs lightly", 2.0, ours_ips, max((p["images_per_s"] for p in lightly), default=None), "images/s", True
    )
    peaks = [p["peak_mem_gib"] for p in official if p.get("peak_mem_gib") is not None]
    ours_peak = ours.get("peak_memory_gib") if ours else None
    ratio_goal("peak memory vs Meta's DINOv2 code", 0.7, ours_peak, min(peaks, default=None), "GiB", False)
    if large is None or large.get("peak_memory_gib") is None:
        goals.append(Goal("ViT-L/14 batch 64 with activation checkpointing", "fits in 80 GB", "not measured", None))
    else:
        used = large["peak_memory_gib"] * GIB
        goals.append(
            Goal(
                "ViT-L/14 batch 64 with activation checkpointing",
                "fits in 80 GB",
                f"{used / 1e9:.1f} GB peak, {large['images_per_s']:.1f} images/s",
                used <= FITS_BYTES,
            )
        )
    stream = None
    if loader:
        data = next((d for label, d in loader.get("data", {}).items() if label.startswith("8-bit")), None)
        if data and data.get("stream"):
            workers = max(data["stream"], key=int)
            stream = data["stream"][workers]["images_per_s"]
    ratio_goal(
        f"loader ({loader['cores'] if loader else '?'} cores) vs the trainer's images/s",
        1.2,
        stream,
        ours_ips,
        "images/s",
        True,
    )
    return goals


def write_summary(out: Path, goals: list[Goal]) -> str:
    mark = {True: "met", False: "**not met**", None: "not measured"}
    lines = []
    records = (_read(out, name) or {} for name in ("train_vitb.json", "peers.json"))
    if any(str(r.get("device", "")).startswith("cpu") for r in records):
        lines += ["CPU smoke run: the verdicts check the script, not the goals (those need the GPU).", ""]
    lines += ["| goal | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {g.name} | {g.target} | {g.measured} | {mark[g.met]} |" for g in goals]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps([asdict(g) for g in goals], indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder gpu_perf.sh wrote")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"gpu_summary: {args.out} is not a folder", file=sys.stderr)
        return 2
    print(write_summary(args.out, check_goals(args.out)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
