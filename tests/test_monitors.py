"""Collapse monitors on synthetic sequences of per-step values: which flags are raised, when, and only once first."""

from __future__ import annotations

import math
import re

import pytest

from raddino.monitors import FLAGS, CollapseMonitor

LOG_K = math.log(4096)  # 8.318 nats; uniform threshold 0.99 * log K = 8.235
D = 192  # representation floor 0.1 / sqrt(192) = 0.0072
HEALTHY = {"student_entropy": 7.9, "teacher_entropy": 7.5, "student_std": 0.06}


def _feed(monitor: CollapseMonitor, rows: list[dict[str, float]]) -> list[list[tuple[str, bool]]]:
    """Flags (name, first) raised at each step 1..len(rows)."""
    return [[(f.name, f.first) for f in monitor.update(step=step, **row)] for step, row in enumerate(rows, start=1)]


def _monitor(**kwargs) -> CollapseMonitor:
    return CollapseMonitor(log_k=LOG_K, embed_dim=D, **{"grace_steps": 10, "window": 5, **kwargs})


def test_healthy_run_raises_nothing():
    assert _feed(_monitor(), [HEALTHY] * 100) == [[]] * 100


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("student_uniform", {"student_entropy": LOG_K - 0.01}),  # uniform student: DINO CE = log K
        ("teacher_uniform", {"teacher_entropy": LOG_K - 1e-4}),  # Sinkhorn-Knopp targets of identical CLS tokens
        ("teacher_collapsed", {"teacher_entropy": 0.02}),  # one prototype
        ("representation_collapse", {"student_std": 1e-4}),  # every image the same feature
    ],
)
def test_each_flag_after_grace_and_window(name, values):
    """Bad from step 1: not raised during the grace period (steps 1-10) nor before the window of 5 steps after it
    (11-14); raised at step 15 with first=True, then every step with first=False."""
    flags = _feed(_monitor(), [{**HEALTHY, **values}] * 30)
    assert flags[:14] == [[]] * 14
    assert flags[14] == [(name, True)]
    assert flags[15:] == [[(name, False)]] * 15


def test_a_single_good_step_restarts_the_window_and_the_flag_drops():
    bad = {**HEALTHY, "student_entropy": LOG_K - 0.01}
    rows = [HEALTHY] * 10 + [bad] * 4 + [HEALTHY] + [bad] * 5 + [HEALTHY] * 3
    flags = _feed(_monitor(), rows)
    assert [step for step, f in enumerate(flags, start=1) if f] == [20]  # 4 bad, 1 good, 5 bad -> step 20 only
    assert flags[19] == [("student_uniform", True)]


def test_first_is_true_once_per_flag_even_after_it_dropped():
    bad = {**HEALTHY, "student_std": 0.001}
    flags = _feed(_monitor(grace_steps=0, window=2), [bad] * 3 + [HEALTHY] + [bad] * 3)
    assert flags == [[], [("representation_collapse", True)], [("representation_collapse", False)], [], [],
                     [("representation_collapse", False)], [("representation_collapse", False)]]  # fmt: skip


def test_thresholds_are_where_documented():
    m = _monitor()
    edge = 0.99 * LOG_K
    assert m.conditions(student_entropy=edge + 1e-6, teacher_entropy=5.0, student_std=0.06)["student_uniform"]
    assert not m.conditions(student_entropy=edge - 1e-6, teacher_entropy=5.0, student_std=0.06)["student_uniform"]
    # a fresh head sits ~0.3-0.4 nats below log K: not uniform
    assert not any(m.conditions(student_entropy=LOG_K - 0.3, teacher_entropy=5.0, student_std=0.06).values())
    assert m.conditions(student_entropy=5.0, teacher_entropy=0.099, student_std=0.06)["teacher_collapsed"]
    assert not m.conditions(student_entropy=5.0, teacher_entropy=0.101, student_std=0.06)["teacher_collapsed"]
    floor = 0.1 / math.sqrt(D)
    assert m.conditions(student_entropy=5.0, teacher_entropy=5.0, student_std=floor * 0.99)["representation_collapse"]
    assert not m.conditions(student_entropy=5.0, teacher_entropy=5.0, student_std=floor * 1.01)[
        "representation_collapse"
    ]


def test_several_flags_in_the_documented_order_and_nan_counts_as_not_holding():
    both = {"student_entropy": LOG_K, "teacher_entropy": LOG_K, "student_std": 1e-5}
    flags = _feed(_monitor(grace_steps=0, window=1), [both, {**both, "student_entropy": math.nan}])
    assert [n for n, _ in flags[0]] == ["student_uniform", "teacher_uniform", "representation_collapse"]
    assert [n for n, _ in flags[1]] == ["teacher_uniform", "representation_collapse"]
    assert list(FLAGS) == ["student_uniform", "teacher_uniform", "teacher_collapsed", "representation_collapse"]
    knob = re.compile(r"\b(teacher|optim|crops|model|loss)\.[a-z_]+")
    assert all(knob.search(message) for message in FLAGS.values())  # every message names a config key to turn


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        CollapseMonitor(log_k=LOG_K, embed_dim=D, grace_steps=0, window=0)
