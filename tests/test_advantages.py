"""normalize -> fuse -> normalize, checked against hand-computed values."""

import math

import pytest
import torch

from rl.advantages import fused_reward_mean, normalize_fuse_normalize

NAN = float("nan")
T = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
G = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731


def approx(t, expected, tol=1e-5):
    assert torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), atol=tol), (t, expected)


def test_upstream_defaults_two_rewards_hand_computed():
    # one group of 3. cer = [0, 1, 2]: mean 1, population std sqrt(2/3) -> z = [-1.2247, 0, 1.2247]
    # sim = [3, 3, 6]: mean 4, std sqrt(6/3) = sqrt(2) -> z = [-1/sqrt2, -1/sqrt2, 2/sqrt2]
    # s = z_cer + 0.5 z_sim; s has mean 0; A = s / std(s)
    zc = [-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3)]
    zs = [-1 / math.sqrt(2), -1 / math.sqrt(2), 2 / math.sqrt(2)]
    s = [a + 0.5 * b for a, b in zip(zc, zs)]
    sd = math.sqrt(sum(x * x for x in s) / 3)
    res = normalize_fuse_normalize({"cer": T(0, 1, 2), "sim": T(3, 3, 6)}, G(7, 7, 7), {"cer": 1.0, "sim": 0.5})
    approx(res.advantages, [x / sd for x in s])
    assert res.informative.all()
    assert res.stats["adv/frac_uninformative"] == 0.0
    assert res.stats["reward/cer/mean"] == pytest.approx(1.0)
    assert res.stats["reward/sim/std"] == pytest.approx(math.sqrt(2))
    assert res.stats["reward/cer/norm_std"] == pytest.approx(1.0)


def test_component_below_min_std_is_zero_for_the_group():
    # sim has no spread -> its component is 0; cer = [1, .5, .5, 0] -> z = [1, 0, 0, -1] / sqrt(.125) * .5
    res = normalize_fuse_normalize(
        {"cer": T(1.0, 0.5, 0.5, 0.0), "sim": T(0.8, 0.8, 0.8, 0.8)}, G(0, 0, 0, 0), {"cer": 1.0, "sim": 0.1}
    )
    approx(res.advantages, [math.sqrt(2), 0.0, 0.0, -math.sqrt(2)])
    # a spread of 0.005 (population std 0.0025 < 1e-2) is no spread either
    res = normalize_fuse_normalize({"cer": T(0.5, 0.505)}, G(0, 0), {"cer": 1.0})
    approx(res.advantages, [0.0, 0.0])
    assert not res.informative.any()
    assert res.stats["adv/frac_uninformative"] == 1.0


def test_nan_is_invalid_excluded_from_stats_and_gets_group_mean():
    # valid entries [1, 3]: mean 2, std 1 -> z = [-1, ., 1]; the NaN gets 0 = the group mean
    # stage 2 over the two samples with a valid reward: s = [-1, 1] -> std 1 -> A = [-1, 0, 1]
    res = normalize_fuse_normalize({"cer": T(1.0, NAN, 3.0)}, G(0, 0, 0), {"cer": 1.0})
    approx(res.advantages, [-1.0, 0.0, 1.0])
    assert res.informative.tolist() == [True, False, True]
    assert res.stats["reward/cer/invalid"] == 1
    assert res.stats["reward/cer/mean"] == pytest.approx(2.0)


def test_partially_invalid_sample_keeps_its_other_reward():
    # sample 2 lacks sim: z_sim = 0 for it; cer alone still ranks it
    res = normalize_fuse_normalize(
        {"cer": T(0.0, 1.0, 2.0), "sim": T(1.0, 3.0, NAN)}, G(0, 0, 0), {"cer": 1.0, "sim": 1.0}
    )
    zc = [-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3)]
    zs = [-1.0, 1.0, 0.0]  # sim over [1, 3]: mean 2, std 1
    s = [a + b for a, b in zip(zc, zs)]
    m = sum(s) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in s) / 3)
    approx(res.advantages, [(x - m) / sd for x in s])
    assert res.informative.all()


def test_single_sample_group_all_invalid_group_identical_group():
    res = normalize_fuse_normalize(
        {"cer": T(5.0, NAN, NAN, 0.7, 0.7, 0.7, 0.0, 1.0)},
        G(1, 2, 2, 3, 3, 3, 4, 4),
        {"cer": 1.0},
    )
    approx(res.advantages, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 1.0])
    assert res.informative.tolist() == [False] * 6 + [True, True]
    assert res.stats["adv/frac_uninformative"] == pytest.approx(3 / 4)
    assert res.stats["reward/cer/invalid"] == 2


def test_every_reward_invalid_sample_gets_zero_and_is_not_informative():
    res = normalize_fuse_normalize(
        {"cer": T(NAN, 0.0, 1.0), "sim": T(NAN, 0.2, 0.2)}, G(0, 0, 0), {"cer": 1.0, "sim": 1.0}
    )
    assert res.advantages[0] == 0.0 and not res.informative[0]
    approx(res.advantages[1:], [-1.0, 1.0])


def test_group_ids_are_explicit_equal_rewards_elsewhere_do_not_merge():
    # the same prompt sampled in two groups: each group is normalised on its own
    res = normalize_fuse_normalize({"cer": T(0.0, 1.0, 10.0, 30.0)}, G(5, 5, 9, 9), {"cer": 1.0})
    approx(res.advantages, [-1.0, 1.0, -1.0, 1.0])
    # interleaved ids work the same
    res = normalize_fuse_normalize({"cer": T(0.0, 10.0, 1.0, 30.0)}, G(5, 9, 5, 9), {"cer": 1.0})
    approx(res.advantages, [-1.0, -1.0, 1.0, 1.0])


def test_zero_weight_and_absent_weight_are_ignored_but_logged():
    r = {"cer": T(0.0, 1.0), "emo": T(5.0, -5.0), "laugh": T(1.0, 0.0)}
    res = normalize_fuse_normalize(r, G(0, 0), {"cer": 1.0, "emo": 0.0})
    approx(res.advantages, [-1.0, 1.0])
    assert "reward/emo/mean" in res.stats and "reward/emo/norm_mean" not in res.stats
    assert res.stats["reward/laugh/mean"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="sim"):
        normalize_fuse_normalize(r, G(0, 0), {"sim": 1.0})


def test_mixed_weights_can_flip_the_ranking():
    # cer prefers sample 0, sim prefers sample 1; the heavier weight decides
    r = {"cer": T(1.0, 0.0), "sim": T(0.0, 1.0)}
    approx(normalize_fuse_normalize(r, G(0, 0), {"cer": 2.0, "sim": 1.0}).advantages, [1.0, -1.0])
    approx(normalize_fuse_normalize(r, G(0, 0), {"cer": 1.0, "sim": 2.0}).advantages, [-1.0, 1.0])
    # equal weights cancel exactly: no signal
    res = normalize_fuse_normalize(r, G(0, 0), {"cer": 1.0, "sim": 1.0})
    approx(res.advantages, [0.0, 0.0])
    assert not res.informative.any()


def test_trl_normalize_then_sum_settings_hand_computed():
    # TRL: z = (r - mean_g) / (unbiased std_g + 1e-4); s = sum w z; A = (s - mean(s)) / (unbiased std(s) + 1e-4)
    eps = 1e-4
    z = 1.0 / (math.sqrt(2.0) + eps)  # group [1, 3]: unbiased std sqrt(2)
    s = [-z, z, 0.0, 0.0]  # group [2, 2]: std 0 -> (r - mean) / eps = 0
    sd = math.sqrt(sum(x * x for x in s) / 3)  # batch mean 0, Bessel over 4 samples
    res = normalize_fuse_normalize(
        {"acc": T(1.0, 3.0, 2.0, 2.0)},
        G(0, 0, 1, 1),
        {"acc": 1.0},
        std_ddof=1,
        eps=eps,
        min_std=0.0,
        second_norm="batch",
    )
    approx(res.advantages, [x / (sd + eps) for x in s])
    assert res.informative.tolist() == [True, True, False, False]


def test_trl_settings_two_rewards_and_batch_mean_is_subtracted():
    eps = 1e-4
    r = {"a": T(0.0, 2.0, 1.0, 1.0), "b": T(1.0, 1.0, 0.0, 4.0)}
    w = {"a": 1.0, "b": 0.5}
    za = 1 / (math.sqrt(2) + eps)  # group 0 of a: [0, 2], unbiased std sqrt2
    zb = 2 / (math.sqrt(8) + eps)  # group 1 of b: [0, 4], unbiased std sqrt8
    s = [-za, za, -0.5 * zb, 0.5 * zb]
    m = sum(s) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in s) / 3)
    res = normalize_fuse_normalize(r, G(0, 0, 1, 1), w, std_ddof=1, eps=eps, min_std=0.0, second_norm="batch")
    approx(res.advantages, [(x - m) / (sd + eps) for x in s])


def test_fused_reward_mean_is_weighted_mean_of_valid_means():
    res = normalize_fuse_normalize({"cer": T(1.0, NAN, 0.0), "sim": T(0.5, 0.5, 1.0)}, G(0, 0, 0), {"cer": 1.0})
    # cer mean over valid = 0.5; sim mean = 2/3
    assert fused_reward_mean(res.stats, {"cer": 1.0, "sim": 0.3}) == pytest.approx(0.5 + 0.3 * 2 / 3)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        normalize_fuse_normalize({"cer": T(1.0, 2.0)}, G(0, 0, 0), {"cer": 1.0})
    with pytest.raises(ValueError, match="second_norm"):
        normalize_fuse_normalize({"cer": T(1.0, 2.0)}, G(0, 0), {"cer": 1.0}, second_norm="global")
