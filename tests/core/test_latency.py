"""The latency model: the machine's slowdown from each signal (checked against the formula
written out), the power-mode column replacing the clock part, and the served-token correction
kept across members."""

from __future__ import annotations

import pytest

from apreqeld.core.latency import SCALE_RANGE, Conditions, Correction, scale, slowdown


@pytest.mark.parametrize(("conditions", "expected", "parts"), [
    (Conditions(), 1.0, set()),
    (Conditions(offload=True, gpu_clock_ratio=0.5), 2.0, {"gpu clock"}),
    (Conditions(offload=True, gpu_others=0.6), 2.5, {"gpu busy with others"}),
    (Conditions(offload=True, gpu_clock_ratio=0.8, gpu_others=0.5), 1 / 0.8 / 0.5,
     {"gpu clock", "gpu busy with others"}),
    (Conditions(cpu_freq_ratio=0.4), 2.5, {"cpu frequency"}),
    (Conditions(cpu_freq_ratio=0.5, cpu_steal=0.2), 2.0 / 0.8, {"cpu frequency", "cpu steal"}),
    (Conditions(offload=True, cpu_freq_ratio=0.5), 1.0, set()),  # the GPU sets the pace
    (Conditions(offload=True, gpu_clock_ratio=0.5, mode_column=True), 1.0, set()),
    (Conditions(cpu_freq_ratio=0.001), 1 / 0.05, {"cpu frequency"}),  # floored, no blow-up
])
def test_each_signal_slows_the_model_by_its_share(conditions: Conditions, expected: float,
                                                  parts: set[str]) -> None:
    got = slowdown(conditions)
    assert got.factor == pytest.approx(min(expected, SCALE_RANGE[1]))
    assert set(got.parts) == parts


def test_the_correction_is_the_machines_across_members() -> None:
    c = Correction(window=8, min_samples=3)
    assert c.value == 1.0
    c.observe(12.0, 10.0, 1.0)  # member measured at 10 ms served at 12
    c.observe(30.0, 20.0, 1.0)  # another member, 1.5x
    assert c.value == 1.0  # fewer samples than asked: no correction yet
    c.observe(26.0, 20.0, 1.0)  # 1.3x
    assert c.value == pytest.approx(1.3)
    # the model already predicts a 2x slowdown: served 2.6x measured is a 1.3x correction
    d = Correction(min_samples=1)
    d.observe(26.0, 10.0, 2.0)
    assert d.value == pytest.approx(1.3)
    assert scale(slowdown(Conditions(cpu_freq_ratio=0.5)), d) == pytest.approx(2.6)
    for bad in ((0.0, 10.0, 1.0), (float("nan"), 10.0, 1.0), (5.0, -1.0, 1.0)):
        d.observe(*bad)
    assert d.samples == 1
