"""The reward-hacking monitor (rl/monitor.py), the best/worst-advantage samples (rl/samples.py pick_samples) and
both in a tiny training run: metrics.jsonl, samples.jsonl, plots/monitor.png, the window across a resume."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_config

from rl.cli import main as cli_main
from rl.config import DEFAULT_CONFIG, MonitorConfig, load_config
from rl.monitor import monitor_metrics, pearson, push, trend
from rl.samples import pick_samples, write_samples
from rl.trainer import TrainState, train, watch_rewards
from rollouts.audio import read_wav

nan = math.nan


def isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ---- pearson / trend / push ----------------------------------------------------------------------------------------


def test_pearson_by_hand():
    # xs [1,2,3], ys [2,4,7]: mean x 2, mean y 13/3; dx = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]
    # sxy = 7/3 + 0 + 8/3 = 5, sxx = 2, syy = (49 + 1 + 64) / 9 = 38/3  ->  r = 5 / sqrt(2 * 38/3) = 5 / sqrt(76/3)
    r = 5 / math.sqrt(76 / 3)
    assert r == pytest.approx(0.9933992677987828, rel=1e-12)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(r, rel=1e-12)
    assert pearson([2, 4, 7], [1, 2, 3]) == pytest.approx(r, rel=1e-12)  # symmetric
    # y = 2x - 1 exactly: +1; y = -x: -1 (clamped into [-1, 1], never a rounding hair outside it)
    assert pearson([1, 2, 3, 4], [1, 3, 5, 7]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [-1, -2, -3]) == -1.0
    # dx = [-1, 0, 1], dy = [0, 1, -1] (y 5, 6, 4): sxy = -1, sxx = syy = 2 -> r = -1/2 exactly
    assert pearson([1, 2, 3], [5, 6, 4]) == -0.5
    # None / NaN / inf on either side drop the pair: what is left is the [1,2,3] ~ [2,4,7] case
    assert pearson([1, None, 2, 3, nan, 9], [2, 5, 4, 7, 9, math.inf]) == pytest.approx(r, rel=1e-12)


def test_pearson_is_nan_with_fewer_than_three_pairs_or_zero_variance():
    assert isnan(pearson([], []))
    assert isnan(pearson([1, 2], [3, 5]))
    assert isnan(pearson([1, 2, None], [3, 5, 7]))  # 2 finite pairs
    assert isnan(pearson([1, 2, 3], [3, nan, 7]))
    assert isnan(pearson([1, 2, 3], [4, 4, 4]))  # y constant
    assert isnan(pearson([2, 2, 2], [1, 5, 9]))  # x constant
    assert isnan(pearson([1, 2, 3, 4], [4, 4, 4, None]))


def test_trend_by_hand():
    # steps [1,2,3], ys [2,4,7]: ds = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]: sum ds*dy = 5, sum ds^2 = 2 -> 5/2
    assert trend([1, 2, 3], [2, 4, 7]) == pytest.approx(2.5, rel=1e-12)
    # the NaN/None point is skipped: (1,2), (3,4), (4,7): mean step 8/3, mean y 13/3; ds = [-5/3, 1/3, 4/3],
    # dy = [-7/3, -1/3, 8/3]: sum ds*dy = (35 - 1 + 32)/9 = 22/3, sum ds^2 = (25 + 1 + 16)/9 = 14/3 -> 11/7
    assert trend([1, 2, 3, 4], [2, None, 4, 7]) == pytest.approx(11 / 7, rel=1e-12)
    assert trend([1, 2, 3, 4], [2, nan, 4, 7]) == pytest.approx(11 / 7, rel=1e-12)
    # two points: the slope through them; shifting the steps does not change a slope
    assert trend([10, 12], [1.0, 0.0]) == pytest.approx(-0.5)
    assert trend([101, 102, 103], [2, 4, 7]) == pytest.approx(2.5, rel=1e-12)
    assert trend([1, 2, 3], [3, 3, 3]) == 0.0


def test_trend_is_nan_with_fewer_than_two_points():
    assert isnan(trend([], []))
    assert isnan(trend([1], [0.5]))
    assert isnan(trend([1, 2, 3], [None, 0.5, nan]))
    assert isnan(trend([5, 5], [1.0, 2.0]))  # no spread of steps


def test_push_keeps_the_last_size_rows_and_stores_non_finite_means_as_none():
    w: list = []
    for s in range(1, 6):
        w = push(w, s, {"a": float(s), "b": -s}, 3)
    assert [r["step"] for r in w] == [3, 4, 5]
    assert [r["means"] for r in w] == [{"a": 3.0, "b": -3.0}, {"a": 4.0, "b": -4.0}, {"a": 5.0, "b": -5.0}]
    before = json.dumps(w)
    w2 = push(w, 6, {"a": nan, "b": math.inf, "c": np.float64(0.25)}, 3)
    assert json.dumps(w) == before  # a new list: the given window is not changed
    assert [r["step"] for r in w2] == [4, 5, 6]
    assert w2[-1] == {"step": 6, "means": {"a": None, "b": None, "c": 0.25}}
    assert type(w2[-1]["means"]["c"]) is float
    json.loads(json.dumps(w2, allow_nan=False))  # JSON-ready (no NaN), as the checkpoint needs
    assert push(w2, 7, {"a": 1.0}, 0) == []
    assert push([], 1, {"a": 1.0}, 1) == [{"step": 1, "means": {"a": 1.0}}]


# ---- monitor_metrics -----------------------------------------------------------------------------------------------


def window(steps, **series):
    return [{"step": s, "means": {k: v[i] for k, v in series.items()}} for i, s in enumerate(steps)]


def test_rising_weighted_reward_with_a_falling_anticorrelated_one_is_flagged():
    # a: 1, 2, 3 (trend 1); b: 6, 4, 2 (trend -2); dx = [-1, 0, 1], dy = [2, 0, -2]: sxy = -4, sxx 2, syy 8 -> -1
    m = monitor_metrics(window([1, 2, 3], a=[1.0, 2.0, 3.0], b=[6.0, 4.0, 2.0]), {"a": 1.0, "b": 0.0}, -0.5)
    assert m == {"monitor/corr/a__b": -1.0, "monitor/trend/a": 1.0, "monitor/trend/b": -2.0, "monitor/hacking": 1}
    # the rising weighted reward sorted second: the pair is still named a__z, and still flagged
    m = monitor_metrics(window([1, 2, 3], z=[1.0, 2.0, 3.0], a=[6.0, 4.0, 2.0]), {"z": 0.5, "a": 0.0}, -0.5)
    assert m == {"monitor/corr/a__z": -1.0, "monitor/trend/a": -2.0, "monitor/trend/z": 1.0, "monitor/hacking": 1}


def test_what_does_not_flag():
    rising, falling = [1.0, 2.0, 3.0], [6.0, 4.0, 2.0]
    # the weighted reward falls while the unweighted one rises: the update is not gaming anything
    m = monitor_metrics(window([1, 2, 3], a=falling, b=rising), {"a": 1.0, "b": 0.0}, -0.5)
    assert m["monitor/corr/a__b"] == -1.0 and m["monitor/hacking"] == 0
    # both unweighted: nothing pushes either up
    assert monitor_metrics(window([1, 2, 3], a=rising, b=falling), {"a": 0.0, "b": 0.0}, -0.5)["monitor/hacking"] == 0
    # a negative weight is not a positive one
    assert monitor_metrics(window([1, 2, 3], a=rising, b=falling), {"a": -1.0, "b": 0.0}, -0.5)["monitor/hacking"] == 0
    # b = 5, 6, 4 (trend -1/2, corr with a -1/2: see test_pearson_by_hand): only below min_corr flags (strictly)
    w = window([1, 2, 3], a=rising, b=[5.0, 6.0, 4.0])
    m = monitor_metrics(w, {"a": 1.0, "b": 0.0}, -0.5)
    assert m == {"monitor/corr/a__b": -0.5, "monitor/trend/a": 1.0, "monitor/trend/b": -0.5, "monitor/hacking": 0}
    assert monitor_metrics(w, {"a": 1.0, "b": 0.0}, -0.6)["monitor/hacking"] == 0
    assert monitor_metrics(w, {"a": 1.0, "b": 0.0}, -0.4)["monitor/hacking"] == 1
    # two steps: trends exist, the correlation does not (NaN never flags)
    m = monitor_metrics(window([1, 2], a=[1.0, 2.0], b=[6.0, 4.0]), {"a": 1.0, "b": 0.0}, 0.99)
    assert isnan(m["monitor/corr/a__b"]) and m["monitor/trend/a"] == 1.0 and m["monitor/trend/b"] == -2.0
    assert m["monitor/hacking"] == 0
    # a missing mean (None) drops that step from the pair: 2 steps left -> NaN, no flag; b's trend over 2 points
    m = monitor_metrics(window([1, 2, 3], a=rising, b=[6.0, None, 2.0]), {"a": 1.0, "b": 0.0}, -0.5)
    assert isnan(m["monitor/corr/a__b"]) and m["monitor/trend/b"] == -2.0 and m["monitor/hacking"] == 0


def test_names_are_sorted_pairs_counted_and_one_reward_has_no_pair():
    w = window([1, 2, 3], c=[1.0, 2.0, 3.0], a=[6.0, 4.0, 2.0], b=[3.0, 2.0, 1.0])
    m = monitor_metrics(w, {"c": 1.0, "a": 0.0, "b": 0.5}, -0.5)
    assert list(m) == [
        "monitor/corr/a__b",
        "monitor/corr/a__c",
        "monitor/corr/b__c",
        "monitor/trend/a",
        "monitor/trend/b",
        "monitor/trend/c",
        "monitor/hacking",
    ]
    # a ~ b +1 (both fall), a ~ c and b ~ c -1 with c rising and weighted: 2 flagged pairs
    assert m["monitor/corr/a__b"] == pytest.approx(1.0) and m["monitor/corr/a__c"] == -1.0
    assert m["monitor/corr/b__c"] == -1.0 and m["monitor/hacking"] == 2
    m = monitor_metrics(window([4, 5, 6], d=[0.1, 0.3, 0.2]), {"d": 1.0}, -0.5)
    assert m == {"monitor/trend/d": pytest.approx(0.05), "monitor/hacking": 0}  # ds [-1,0,1], dy [-.1,.1,0]: .1/2


def test_watch_rewards_records_the_logged_step_and_is_off_with_window_0():
    # train() sets run.state.step = step + 1 before watch_rewards, and logs the row as state.step: the window's
    # steps are the metrics rows' steps
    run = SimpleNamespace(
        cfg=SimpleNamespace(monitor=MonitorConfig(window=3, min_corr=-0.5)),
        derived=SimpleNamespace(weights={"a": 1.0, "b": 0.0}),
        state=TrainState(run_id="x"),
    )
    for step, (a, b) in enumerate([(0.0, 9.0), (1.0, 6.0), (2.0, 4.0), (3.0, 2.0)]):
        run.state.step = step + 1
        out = watch_rewards(run, {"reward/a/mean": a, "reward/b/mean": b, "loss": 0.0})
    assert [r["step"] for r in run.state.monitor] == [2, 3, 4]
    assert out == {"monitor/corr/a__b": -1.0, "monitor/trend/a": 1.0, "monitor/trend/b": -2.0, "monitor/hacking": 1}
    run.state.step = 5
    out = watch_rewards(run, {"reward/a/mean": nan})  # b not logged: None as well
    assert run.state.monitor[-1] == {"step": 5, "means": {"a": None, "b": None}}
    run.cfg = SimpleNamespace(monitor=MonitorConfig(window=0))
    before = list(run.state.monitor)
    assert watch_rewards(run, {"reward/a/mean": 1.0, "reward/b/mean": 2.0}) == {}
    assert run.state.monitor == before


# ---- pick_samples and the files --------------------------------------------------------------------------------------


def test_pick_samples_first_best_worst():
    # groups 0 and 1: first rows 0 and 3; group 0 best 1 (1.0), worst 2 (-1.0); group 1 best 5, worst 4
    ids, adv = [0, 0, 0, 1, 1, 1], [0.2, 1.0, -1.0, 0.0, -0.5, 0.5]
    assert pick_samples(ids, adv, 2, 2) == [
        (0, "first"),
        (3, "first"),
        (1, "best"),
        (2, "worst"),
        (5, "best"),
        (4, "worst"),
    ]
    assert pick_samples(ids, adv, 1, 1) == [(0, "first"), (1, "best"), (2, "worst")]  # only the first group's
    assert pick_samples(ids, adv, 2, 0) == [(0, "first"), (3, "first")]  # monitor.sample_groups 0: off
    assert pick_samples(ids, adv, 1, 5) == pick_samples(ids, adv, 1, 2)  # more groups than there are
    # groups in order of appearance, not of id
    assert pick_samples([7, 7, 2, 2], [1.0, -1.0, -3.0, 3.0], 1, 2) == [
        (0, "best"),
        (1, "worst"),
        (3, "best"),
        (2, "worst"),
    ]


def test_pick_samples_ties_equal_groups_nan_and_doubles():
    # ties: the first row with the highest (1, not 3) and the first with the lowest (2, not 4)
    assert pick_samples([0] * 5, [0.0, 2.0, -3.0, 2.0, -3.0], 1, 1) == [(0, "first"), (1, "best"), (2, "worst")]
    # group 0's advantages are all equal: nothing is reinforced, no best or worst; group 1 has both
    assert pick_samples([0, 0, 1, 1], [0.5, 0.5, 1.0, -1.0], 1, 2) == [(0, "first"), (2, "best"), (3, "worst")]
    assert pick_samples([0, 0, 0], [0.0, 0.0, 0.0], 1, 1) == [(0, "first")]
    # NaN is left out: never best or worst (the first row is still saved as first)
    assert pick_samples([0, 0, 0], [nan, 1.0, -1.0], 1, 1) == [(0, "first"), (1, "best"), (2, "worst")]
    assert pick_samples([0, 0, 0, 0], [-5.0, nan, 4.0, nan], 0, 1) == [(2, "best"), (0, "worst")]
    assert pick_samples([0, 0], [nan, 1.0], 1, 1) == [(0, "first")]  # one finite row: nothing to compare
    assert pick_samples([0, 0], [nan, nan], 1, 1) == [(0, "first")]
    # a row both first and best (or worst) is saved once, as best (worst), in its first place
    assert pick_samples([0, 0, 0], [1.0, -1.0, 0.0], 1, 1) == [(0, "best"), (1, "worst")]
    assert pick_samples([0, 0, 1, 1], [-1.0, 1.0, 2.0, 0.0], 2, 2) == [
        (0, "worst"),
        (2, "best"),
        (1, "best"),
        (3, "worst"),
    ]


def test_write_samples_names_best_and_worst_wavs_and_records_the_pick(tmp_path):
    rate = 8000
    audio = [np.full(800, 0.1 * (i + 1), np.float32) for i in range(4)]
    base = dict(target_text="t", prompt_text="p", finished=True, invalid={})
    rows = [
        {**base, "uttid": "utt1", "group_id": 3, "pick": "first", "advantage": 0.0, "rewards": {"d": 0.5}},
        {**base, "uttid": "utt1", "group_id": 3, "pick": "best", "advantage": 1.5, "rewards": {"d": 0.9}},
        {**base, "uttid": "utt1", "group_id": 3, "pick": "worst", "advantage": -1.5, "rewards": {"d": nan}},
        {**base, "uttid": "utt2", "group_id": 4, "advantage": 0.1, "rewards": {"d": 0.1}},  # no pick: as first
    ]
    out = write_samples(tmp_path, 10, rows, audio, rate)
    folder = tmp_path / "samples" / "step-000010"
    names = ["utt1_g3.wav", "utt1_g3_best.wav", "utt1_g3_worst.wav", "utt2_g4.wav"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert lines == out
    assert [x["pick"] for x in lines[:3]] == ["first", "best", "worst"] and "pick" not in lines[3]
    assert [x["wav"] for x in lines] == [str(folder / n) for n in names]
    assert lines[2]["rewards"] == {"d": None} and lines[1]["advantage"] == 1.5
    for x, wav in zip(lines, audio):
        got, r = read_wav(x["wav"])
        assert r == rate and x["seconds"] == 0.1 and np.allclose(got, wav, atol=1e-4)
    # the same name twice in one step gets a counter, never overwrites
    write_samples(tmp_path, 11, [rows[1], rows[1]], audio[:2], rate)
    assert sorted(p.name for p in (tmp_path / "samples" / "step-000011").iterdir()) == [
        "utt1_g3_best.wav",
        "utt1_g3_best_2.wav",
    ]


# ---- a tiny training run with two rewards (resumed: tests/test_trainer.py) -------------------------------------------

TWO_REWARDS = (
    "rewards.len.scorer=scorers_for_tests:Longer",  # weight 0: watched, not trained on
    "rewards.len.weight=0",
    "data.prompts_per_step=2",
    "sampling.group_size=3",
    "monitor.window=3",
    "monitor.sample_groups=2",
    "train.samples_every=2",
    "train.samples_per_step=1",
    "train.save_every=2",
    "vocoder.n_timesteps=2",
)
STEPS = 5
MONITOR = ("monitor/corr/duration__len", "monitor/trend/duration", "monitor/trend/len", "monitor/hacking")


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def two_reward_run(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("monitor")
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp, tiny_ckpt, f"train.steps={STEPS}", *TWO_REWARDS))
    train(cfg, d, progress=False)
    return tmp / "run"


def _slope(xs, ys):
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    return float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())


@pytest.mark.slow
def test_two_reward_run_logs_the_monitor_every_step(two_reward_run):
    log = read_jsonl(two_reward_run / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    for r in log:
        assert set(MONITOR) <= set(r) and not {k for k in r if k.startswith("monitor/")} - set(MONITOR), r.keys()
    assert log[0]["monitor/corr/duration__len"] is None and log[1]["monitor/corr/duration__len"] is None
    assert log[0]["monitor/trend/duration"] is None and log[0]["monitor/trend/len"] is None  # one point
    # recomputed independently from the logged reward means over the last 3 logged steps
    for i, r in enumerate(log):
        win = log[max(0, i - 2) : i + 1]
        steps = [w["step"] for w in win]
        dur, ln = [w["reward/duration/mean"] for w in win], [w["reward/len/mean"] for w in win]
        assert all(isinstance(v, float) for v in dur + ln)  # every mean finite in this run
        if i >= 1:
            assert r["monitor/trend/duration"] == pytest.approx(_slope(steps, dur), rel=1e-9, abs=1e-12)
            assert r["monitor/trend/len"] == pytest.approx(_slope(steps, ln), rel=1e-9, abs=1e-12)
        corr = r["monitor/corr/duration__len"]
        if i >= 2 and np.std(dur) > 0 and np.std(ln) > 0:
            assert corr == pytest.approx(float(np.corrcoef(dur, ln)[0, 1]), rel=1e-9, abs=1e-12)
        elif i >= 2:
            assert corr is None
        td, tl = r["monitor/trend/duration"], r["monitor/trend/len"]
        flagged = corr is not None and td is not None and tl is not None and td > 0 and tl < 0 and corr < -0.5
        assert r["monitor/hacking"] == int(flagged)  # only duration is weighted: one direction only
    assert any(r["monitor/corr/duration__len"] is not None for r in log[2:])
    # the window in the last checkpoint holds the last 3 logged steps and their means
    state = json.loads((two_reward_run / "checkpoints" / "step-000005" / "trainer_state.json").read_text())
    assert state["monitor"] == [
        {"step": r["step"], "means": {"duration": r["reward/duration/mean"], "len": r["reward/len/mean"]}}
        for r in log[-3:]
    ]


@pytest.mark.slow
def test_two_reward_run_saves_best_and_worst_samples_and_plots_the_monitor(two_reward_run, capsys):
    lines = read_jsonl(two_reward_run / "samples.jsonl")
    assert {x["step"] for x in lines} == {2, 4}
    for step in (2, 4):
        rows = [x for x in lines if x["step"] == step]
        groups = list(dict.fromkeys(x["group_id"] for x in rows))
        assert len(groups) <= 2 and {x["pick"] for x in rows} <= {"first", "best", "worst"}
        assert sum(x["pick"] == "first" for x in rows) <= 1
        for g in groups:
            picked = {x["pick"]: x for x in rows if x["group_id"] == g}
            if "best" in picked or "worst" in picked:  # both or neither, the best above the worst
                assert picked["best"]["advantage"] > picked["worst"]["advantage"]
                assert picked["best"]["wav"].endswith(f"_g{g}_best.wav")
                assert picked["worst"]["wav"].endswith(f"_g{g}_worst.wav")
            assert set(picked["best" if "best" in picked else "first"]["rewards"]) == {"duration", "len"}
        assert len(rows) == len({x["wav"] for x in rows})
    assert any(x["pick"] == "best" for x in lines) and any(x["pick"] == "worst" for x in lines)

    assert cli_main(["plot", str(two_reward_run)]) == 0
    png = two_reward_run / "plots" / "monitor.png"
    assert str(png) in capsys.readouterr().out.split()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_config_check_rejects_bad_monitor_settings(capsys):
    for bad, msg in [
        ("monitor.window=2", "monitor.window must be 0 (off) or >= 3"),
        ("monitor.window=-1", "monitor.window must be 0 (off) or >= 3"),
        ("monitor.min_corr=1.5", "monitor.min_corr must be in [-1, 1]"),
        ("monitor.min_corr=-1.01", "monitor.min_corr must be in [-1, 1]"),
        ("monitor.sample_groups=-1", "monitor.sample_groups must be >= 0"),
    ]:
        assert cli_main(["config", "check", str(DEFAULT_CONFIG), "--set", bad]) == 2, bad
        err = capsys.readouterr().err
        assert "config error" in err and msg in err, (bad, err)
    for good in ("monitor.window=0", "monitor.window=3", "monitor.min_corr=1", "monitor.min_corr=-1"):
        assert cli_main(["config", "check", str(DEFAULT_CONFIG), "--set", good]) == 0, good
        assert ": ok" in capsys.readouterr().out
