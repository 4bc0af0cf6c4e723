from __future__ import annotations

import math

import pytest

from raddino.schedules import Schedules, cosine, linear_warmup


def test_cosine_with_warmup_values():
    kw = dict(start=1.0, end=0.1, total_steps=110, warmup_steps=10)
    assert cosine(0, **kw) == 0.0
    assert cosine(5, **kw) == pytest.approx(0.5)
    assert cosine(10, **kw) == pytest.approx(1.0)
    assert cosine(60, **kw) == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert cosine(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert cosine(110, **kw) == pytest.approx(0.1)
    assert cosine(1000, **kw) == pytest.approx(0.1)


def test_linear_warmup_then_constant():
    assert linear_warmup(0, start=0.04, end=0.07, warmup_steps=30) == pytest.approx(0.04)
    assert linear_warmup(15, start=0.04, end=0.07, warmup_steps=30) == pytest.approx(0.055)
    assert linear_warmup(30, start=0.04, end=0.07, warmup_steps=30) == pytest.approx(0.07)
    assert linear_warmup(99, start=0.04, end=0.07, warmup_steps=30) == pytest.approx(0.07)


def test_schedules_at_chosen_steps():
    s = Schedules(
        lr=2e-3,
        min_lr=1e-6,
        warmup_steps=100,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_start=0.992,
        momentum_end=1.0,
        teacher_temp_start=0.04,
        teacher_temp_end=0.07,
        teacher_temp_warmup_steps=300,
        freeze_last_layer_steps=50,
        total_steps=1000,
    )
    v0, v50, v100, v550, v1000 = (s.at(k) for k in (0, 50, 100, 550, 1000))
    assert v0.lr == 0.0 and v50.lr == pytest.approx(1e-3) and v100.lr == pytest.approx(2e-3)
    assert v550.lr == pytest.approx((2e-3 + 1e-6) / 2)
    assert v1000.lr == pytest.approx(1e-6)
    assert v0.weight_decay == pytest.approx(0.04) and v1000.weight_decay == pytest.approx(0.4)
    assert v0.momentum == pytest.approx(0.992) and v1000.momentum == pytest.approx(1.0)
    assert s.at(500).momentum == pytest.approx(0.996)
    assert v0.teacher_temp == pytest.approx(0.04) and s.at(150).teacher_temp == pytest.approx(0.055)
    assert v0.last_layer_lr == 0.0 and s.at(49).last_layer_lr == 0.0
    assert v50.last_layer_lr == pytest.approx(v50.lr) and v50.last_layer_lr > 0
