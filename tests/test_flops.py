"""Model-FLOP counts against a hand count and against torch's FlopCounterMode, and the `raddino bench train` harness
on the CPU (it runs and reports consistent numbers; no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from raddino.cli import main
from raddino.flops import head_flops, ssl_step_flops, vit_forward_flops
from raddino.models.heads import DINOHead
from raddino.models.vit import build_backbone


def test_vit_forward_flops_hand_count():
    """ViT-Ti/14 at 28 px: D = 192, 12 blocks, N = 4 patches, T = 5 tokens; MLP ratio 4 -> 12 D^2 of linear weights
    per block (qkv 3 D^2, proj D^2, fc1 + fc2 8 D^2)."""
    vit = build_backbone(arch="tiny", img_size=28, patch_size=14)
    d, t, n = 192, 5, 4
    per_block = 2 * t * 12 * d * d + 4 * t * t * d
    patch_embed = 2 * (3 * 14 * 14) * d * n
    assert vit_forward_flops(vit, image_size=28) == 12 * per_block + patch_embed


def test_vit_forward_flops_match_torch_flop_counter():
    vit = build_backbone(arch="tiny", img_size=56, patch_size=14, num_registers=4).eval()
    for block in vit.blocks:  # explicit q @ k^T and attn @ v matmuls: the counter has no rule for CPU fused SDPA
        block.attn.fused_attn = False
    for size in (28, 56, 98):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vit.forward_features(torch.zeros(2, 3, size, size))
        assert vit_forward_flops(vit, image_size=size) * 2 == counter.get_total_flops(), size


def test_head_flops_match_torch_flop_counter():
    head = DINOHead(in_dim=192, out_dim=1000, hidden_dim=64, bottleneck_dim=32, nlayers=3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(torch.zeros(7, 192))
    assert head_flops(head, rows=7) == counter.get_total_flops()


def test_step_flops_teacher_once_student_three_times():
    from raddino.build import meta_arch_from_config
    from raddino.config import load_config

    cfg = load_config("tiny_cpu", ["head.out_dim=256", "head.hidden_dim=64", "head.bottleneck_dim=32"])
    model = meta_arch_from_config(cfg)
    flops = ssl_step_flops(model, batch_size=4, global_size=56, local_size=28, n_global=2, n_local=2, masked_patches=10)
    vit = model.student["backbone"]
    head = model.student["dino_head"]
    teacher = 8 * vit_forward_flops(vit, image_size=56) + head_flops(head, rows=8) + head_flops(head, rows=10)
    student = teacher + 8 * vit_forward_flops(vit, image_size=28) + head_flops(head, rows=8)
    assert (flops.teacher_forward, flops.student_forward) == (teacher, student)
    assert flops.total == teacher + 3 * student


@pytest.mark.parametrize("pack", [False, True])
def test_bench_train_cpu_smoke(tmp_path, capsys, pack):
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "train", "--arch", "tiny", "--batch", "4", "--global-size", "28", "--local-size", "14"]
        + ["--n-local", "2", "--device", "cpu", "--workers", "0", "--steps", "2", "--warmup", "1", "--json", str(out)]
        + ["head.out_dim=256", "head.hidden_dim=64", "head.bottleneck_dim=32", "model.img_size=28"]
        + (["--pack"] if pack else [])
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "MFU" in printed and "student_forward_backward" in printed and f"pack={pack}" in printed
    result = json.loads(out.read_text())
    assert result["pack_crops"] is pack
    assert result["steps"] == 2 and result["batch"] == 4 and result["crops"] == "2x28 + 2x14"
    assert set(result["phase_s"]) == {"data", "teacher_forward", "student_forward_backward", "optimizer", "ema"}
    assert result["step_s"] > 0 and abs(sum(result["phase_s"].values()) - result["step_s"]) < 0.5 * result["step_s"]
    assert result["achieved_tflops"] * 1e12 * result["step_s"] == pytest.approx(result["flops_per_step"])
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / result["peak_tflops"])
