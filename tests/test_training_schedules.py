"""Learning-rate schedules: values at hand-computed steps, warm-up, the end, bad input."""

import math

import pytest

from refbnn.training import lr_at


def test_constant_and_warmup():
    assert [lr_at(s, 1.0, 10, "constant", warmup_steps=4) for s in range(6)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_step():
    vals = [lr_at(s, 1.0, 100, "step", step_size=30, gamma=0.1) for s in (0, 29, 30, 59, 60, 99)]
    for got, want in zip(vals, [1.0, 1.0, 0.1, 0.1, 0.01, 0.001]):
        assert math.isclose(got, want, rel_tol=1e-12)


def test_cosine_and_linear():
    assert lr_at(0, 2.0, 11, "cosine") == 2.0
    assert math.isclose(lr_at(5, 2.0, 11, "cosine"), 1.0 + math.cos(math.pi * 5 / 11))
    assert math.isclose(lr_at(11, 2.0, 11, "cosine"), 0.0, abs_tol=1e-15)
    assert lr_at(3, 1.0, 10, "linear") == pytest.approx(0.7)
    # after a warm-up of 2 steps the decay runs over the remaining 8
    assert lr_at(2, 1.0, 10, "linear", warmup_steps=2) == 1.0
    assert lr_at(6, 1.0, 10, "linear", warmup_steps=2) == pytest.approx(0.5)
    assert lr_at(50, 1.0, 10, "linear") == 0.0
    want = 0.5 + 0.25 * (1 + math.cos(0.4 * math.pi))
    assert lr_at(4, 1.0, 10, "cosine", final_lr=0.5) == pytest.approx(want)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 1.0, 10, "exp")
    with pytest.raises(ValueError, match="step must be"):
        lr_at(-1, 1.0, 10)
    with pytest.raises(ValueError, match="step_size"):
        lr_at(0, 1.0, 10, "step")
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, 1.0, 10, warmup_steps=11)
