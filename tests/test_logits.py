"""Sampling controls (temperature, top-k, top-p, CFG and its schedule) against hand-computed values."""

import math

import pytest
import torch

from engine.errors import TesseraError
from samplers.logits import (
    SAMPLING_DEFAULTS,
    apply_temperature,
    cfg_combine,
    cfg_scale_at,
    check_sampling_kwargs,
    process_logits,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")


def test_temperature_scales_logits():
    logits = torch.tensor([0.0, math.log(4.0)])
    probs = apply_temperature(logits, 2.0).softmax(-1)  # [0, log 2] -> [1/3, 2/3]
    torch.testing.assert_close(probs, torch.tensor([1 / 3, 2 / 3]))
    assert torch.equal(apply_temperature(logits, 1.0), logits)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, -1.0, 0.0, 5.0]])
    out = top_k_filter(logits, 2)
    expected = torch.tensor([[NEG, 3.0, 2.0, NEG], [4.0, NEG, NEG, 5.0]])
    assert torch.equal(out, expected)
    assert torch.equal(top_k_filter(logits, 0), logits)  # 0 = off
    assert torch.equal(top_k_filter(logits, 4), logits)  # k >= V = off
    # entries tied with the k-th largest are all kept
    tied = top_k_filter(torch.tensor([2.0, 1.0, 1.0, 0.0]), 2)
    assert torch.equal(tied, torch.tensor([2.0, 1.0, 1.0, NEG]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.05, 0.5, 0.15, 0.3 (deliberately not sorted)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]  # 0.5 >= 0.4 alone
    assert kept(0.7) == [False, True, False, True]  # 0.5 < 0.7 <= 0.8
    assert kept(0.9) == [False, True, True, True]  # 0.8 < 0.9 <= 0.95
    assert kept(0.97) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # never empty
    # kept logits are unchanged, so renormalising gives the truncated distribution
    out = top_p_filter(logits, 0.7).softmax(-1)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))


def test_top_p_rows_are_independent():
    a = torch.tensor([0.6, 0.3, 0.1]).log()
    b = torch.tensor([0.25, 0.15, 0.6]).log()
    both = top_p_filter(torch.stack([a, b]), 0.75)
    assert torch.equal(both[0], top_p_filter(a, 0.75))
    assert torch.equal(both[1], top_p_filter(b, 0.75))
    assert torch.isfinite(both).tolist() == [[True, True, False], [True, False, True]]


def test_process_logits_order_temperature_topk_topp():
    logits = torch.tensor([4.0, 2.0, 0.0, -2.0]) * 2  # temperature 2 gives back [4, 2, 0, -2]
    probs = process_logits(logits, temperature=2.0, top_k=3, top_p=0.95)
    e = torch.tensor([4.0, 2.0, 0.0]).exp()
    p3 = e / e.sum()  # after top-k: [0.867, 0.117, 0.016]; top-p 0.95 then drops the last one
    assert p3[0] + p3[1] >= 0.95 and p3[0] < 0.95
    expected = torch.tensor([p3[0], p3[1], 0.0, 0.0])
    expected = expected / expected.sum()
    torch.testing.assert_close(probs, expected)
    assert probs.dtype == torch.float32


def test_cfg_combine_formula():
    cond = torch.tensor([1.0, 2.0, -1.0])
    uncond = torch.tensor([0.5, 3.0, -1.0])
    torch.testing.assert_close(cfg_combine(cond, uncond, 3.0), torch.tensor([2.0, 0.0, -1.0]))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), uncond)


def test_cfg_schedules():
    n, cfg = 16, 4.0
    assert [cfg_scale_at(t, n, cfg, "constant") for t in range(n)] == [cfg] * n
    linear = [cfg_scale_at(t, n, cfg, "linear") for t in range(n)]
    assert linear[-1] == cfg  # reaches the nominal scale on the last step
    assert linear[0] == pytest.approx(1 + (cfg - 1) / n)
    assert all(b > a for a, b in zip(linear, linear[1:]))
    assert cfg_scale_at(0, 1, cfg, "linear") == cfg
    with pytest.raises(TesseraError, match="cfg_schedule"):
        cfg_scale_at(0, n, cfg, "cosine")


def test_check_sampling_kwargs():
    s = check_sampling_kwargs({})
    assert s == SAMPLING_DEFAULTS
    s = check_sampling_kwargs({"top_k": 10, "cfg": 2})
    assert s["top_k"] == 10 and s["cfg"] == 2.0 and s["temperature"] == 1.0
    with pytest.raises(TesseraError, match="'topk'"):
        check_sampling_kwargs({"topk": 10})
    for bad in ({"temperature": 0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"cfg_schedule": "x"}):
        with pytest.raises(TesseraError):
            check_sampling_kwargs(bad)
    with pytest.raises(TesseraError):
        check_sampling_kwargs({"temperature": "hot"})
    # a prior can add its own keys
    assert check_sampling_kwargs({"num_iter": 8}, extra={"num_iter": 64})["num_iter"] == 8
