import math

import pytest
import torch

from rl.dynamic_sampling import (
    DynamicSampling,
    DynamicSamplingExhausted,
    GroupResult,
    check_keys,
    informative_groups,
)
from rl.schedules import Schedule

# --- schedules -------------------------------------------------------------------------------------------------


def test_linear_schedule_upstream_clip_higher():
    eps_high = Schedule(kind="linear", start=0.3, end=0.5, steps=1000)
    assert [eps_high(t) for t in (0, 500, 1000, 5000)] == pytest.approx([0.3, 0.4, 0.5, 0.5])


def test_exp_decay_is_upstream_dynamic_T():
    temp = Schedule(kind="exp_decay", start=3.0, rate=0.005)
    assert temp(0) == pytest.approx(3.0)
    assert temp(200) == pytest.approx(1 + 2 * math.exp(-1))
    cut = Schedule(kind="exp_decay", start=3.0, rate=0.005, steps=100)
    assert cut(99) == pytest.approx(1 + 2 * math.exp(-0.495)) and cut(100) == 1.0


def test_constant_and_validation():
    assert Schedule.from_scalar(0.2)(12345) == 0.2
    with pytest.raises(ValueError, match="steps"):
        Schedule(kind="linear", start=0.2, end=0.3).validate("loss.eps_low")
    with pytest.raises(ValueError, match="rate"):
        Schedule(kind="exp_decay", start=2.0).validate("sampling.temperature")


def test_schedule_is_a_pure_function_of_the_step():
    s = Schedule(kind="linear", start=1.0, end=3.0, steps=10)
    forward = [s(t) for t in range(12)]
    assert [s(t) for t in reversed(range(12))][::-1] == forward


# --- which groups are informative ---------------------------------------------------------------------------


def test_default_check_keys_drop_sim_and_unweighted():
    assert check_keys({"cer": 1.0, "sim": 0.1, "emo": 0.0}, None) == ["cer"]
    assert check_keys({"sim": 1.0}, None) == ["sim"]  # nothing else to measure
    with pytest.raises(ValueError, match="emo"):
        check_keys({"cer": 1.0, "emo": 0.0}, ["emo"])


def test_informative_groups_measured_on_keys_only():
    rewards = {
        "cer": torch.tensor([1.0, 1.0, 0.2, 0.9]),  # group 10: alike; group 20: varies
        "sim": torch.tensor([0.1, 0.9, 0.5, 0.5]),  # group 10: varies (ignored by the check)
    }
    gid = torch.tensor([10, 10, 20, 20])
    w = {"cer": 1.0, "sim": 0.1}
    assert informative_groups(rewards, gid, w, ["cer"], min_std=1e-2) == {10: False, 20: True}
    assert informative_groups(rewards, gid, w, ["cer", "sim"], min_std=1e-2) == {10: True, 20: True}


# --- resampling plans ---------------------------------------------------------------------------------------


def results(req, informative, start_gid=0):
    return [
        GroupResult(slot=s, group_id=start_gid + i, informative=f)
        for i, (s, f) in enumerate(zip(req.slots, informative))
    ]


def test_reroll_resamples_only_uninformative_slots_up_to_max_tries():
    plan = DynamicSampling("reroll", 3, max_tries=3)
    req = plan.next_request()
    assert req.slots == (0, 1, 2) and req.fresh
    plan.record(results(req, [True, False, False]))
    req = plan.next_request()
    assert req.slots == (1, 2) and not req.fresh  # same prompts, new samples
    plan.record(results(req, [True, False], start_gid=10))
    req = plan.next_request()
    assert req.slots == (2,)
    plan.record(results(req, [False], start_gid=20))
    assert plan.next_request() is None  # 3 attempts in all: keep what there is
    chosen = plan.selected()
    assert [(r.slot, r.group_id, r.informative) for r in chosen] == [(0, 0, True), (1, 10, True), (2, 20, False)]
    assert plan.generations == 3 and plan.discarded == 3


def test_reroll_stops_as_soon_as_every_group_is_informative():
    plan = DynamicSampling("reroll", 2, max_tries=3)
    plan.record(results(plan.next_request(), [True, True]))
    assert plan.next_request() is None and plan.generations == 1 and plan.discarded == 0


def test_refill_draws_new_prompts_until_enough_informative_groups():
    plan = DynamicSampling("refill", 3, max_gen_batches=4)
    req = plan.next_request()
    plan.record(results(req, [True, False, True]))
    req = plan.next_request()
    assert req.slots == (3,) and req.fresh
    plan.record(results(req, [False], start_gid=3))
    req = plan.next_request()
    assert req.slots == (4,)
    plan.record(results(req, [True], start_gid=4))
    assert plan.next_request() is None
    assert [r.slot for r in plan.selected()] == [0, 2, 4]
    assert plan.generations == 3 and plan.discarded == 2


def test_refill_exhausted_raises_or_keeps_topped_up():
    plan = DynamicSampling("refill", 2, max_gen_batches=2, on_exhausted="error")
    plan.record(results(plan.next_request(), [False, False]))
    plan.record(results(plan.next_request(), [False, False], start_gid=2))
    with pytest.raises(DynamicSamplingExhausted, match="max_gen_batches"):
        plan.next_request()

    plan = DynamicSampling("refill", 3, max_gen_batches=2, on_exhausted="keep")
    plan.record(results(plan.next_request(), [True, False, False]))
    plan.record(results(plan.next_request(), [False, False], start_gid=3))
    assert plan.next_request() is None
    chosen = plan.selected()  # 1 informative + the 2 latest uninformative: the batch keeps its size
    assert [r.slot for r in chosen] == [0, 3, 4]
    assert plan.discarded == 2


def test_off_mode_generates_once():
    plan = DynamicSampling("off", 2)
    plan.record(results(plan.next_request(), [False, False]))
    assert plan.next_request() is None and len(plan.selected()) == 2


def test_plan_misuse_is_an_error():
    plan = DynamicSampling("reroll", 2)
    req = plan.next_request()
    with pytest.raises(ValueError, match="slots"):
        plan.record(results(req, [True]))
    with pytest.raises(RuntimeError):
        plan.next_request()
