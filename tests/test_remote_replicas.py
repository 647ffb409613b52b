"""A remote reward over several replicas: the load spreads, a dead replica fails over, both dead is invalid."""

import time

import numpy as np
import pytest
from conftest import ServerThread, audio_sample, free_port
from scorers_for_tests import Broken, Slow

from rewards.base import ScorerConfigError, check_scorer_kwargs
from rewards.duration import DurationScorer
from rewards.remote import RemoteScorer, RewardServiceError
from rewards.server import create_app


@pytest.fixture(scope="module")
def samples():
    return [audio_sample("今天天气很好", seed=i, seconds=0.6 + 0.1 * i, uttid=f"u{i % 3}") for i in range(8)]


@pytest.fixture()
def two():
    servers = [ServerThread(create_app(DurationScorer(), "d")) for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def test_batches_spread_over_replicas_fewest_outstanding(two, samples):
    remote = RemoteScorer([s.url for s in two], batch_size=2, max_concurrency=1)
    res = remote(samples)  # 4 requests, one in flight per replica
    assert res.valid.all()
    np.testing.assert_array_equal(res.values, DurationScorer()(samples).values)
    st = remote.replica_stats()
    assert st["remote/0/requests"] >= 1 and st["remote/1/requests"] >= 1
    assert st["remote/0/requests"] + st["remote/1/requests"] == 4
    assert st["remote/0/errors"] == st["remote/1/errors"] == 0 and st["remote/0/latency_s"] > 0
    popped = remote.pop_stats()
    assert popped["requests"] == 4 and popped["errors"] == 0 and popped["failovers"] == 0
    assert popped["replica/0/requests"] + popped["replica/1/requests"] == 4
    # one request per call: equal replicas take turns from call to call (round robin on ties)
    for _ in range(4):
        assert remote(samples[:2]).valid.all()
    st = remote.replica_stats()
    assert st["remote/0/requests"] + st["remote/1/requests"] == 8
    assert abs(st["remote/0/requests"] - st["remote/1/requests"]) <= 2
    assert remote.pop_stats()["replica/0/requests"] == 2


class Timed(Slow):
    """Slow, recording when each batch was scored (the servers run in this process)."""

    def __init__(self, seconds, log, name):
        super().__init__(seconds)
        self.log, self.name = log, name

    def __call__(self, samples):
        t0 = time.monotonic()
        out = super().__call__(samples)
        self.log.append((self.name, t0, time.monotonic()))
        return out


def test_two_replicas_score_concurrently():
    log = []
    servers = [ServerThread(create_app(Timed(0.3, log, i), f"s{i}")) for i in range(2)]
    try:
        batch = [audio_sample(seed=i) for i in range(4)]
        remote = RemoteScorer([s.url for s in servers], batch_size=1, max_concurrency=1, timeout_s=30)
        assert remote(batch).valid.all()
        st = remote.replica_stats()
        assert st["remote/0/requests"] == st["remote/1/requests"] == 2, st  # 0.3 s each: they alternate
        # the two replicas scored at the same time (one replica alone would take the 4 batches one by one)
        spans = {i: [(a, b) for n, a, b in log if n == i] for i in range(2)}
        assert any(a0 < b1 and a1 < b0 for a0, b0 in spans[0] for a1, b1 in spans[1]), log
    finally:
        for s in servers:
            s.stop()


def test_a_replica_shut_down_mid_run_fails_over_then_both_dead_is_invalid(two, samples, capsys):
    remote = RemoteScorer([s.url for s in two], batch_size=2, retries=1, backoff_s=0.01, timeout_s=5, cooldown_s=1.0)
    assert remote.check()["ready"]
    assert remote(samples).valid.all()
    remote.pop_stats()
    two[1].stop()  # replica 1 goes away mid-run
    for _ in range(3):
        res = remote(samples)
        assert res.valid.all() and np.isfinite(res.values).all(), res.reasons
    popped = remote.pop_stats()
    st = remote.replica_stats()
    assert st["remote/1/errors"] >= 1 and st["remote/0/errors"] == 0
    assert popped["errors"] >= 1 and popped["failovers"] >= 1 and popped["failed_requests"] == 0
    assert popped["replica/1/errors"] == popped["replica/1/requests"] >= 1
    # it is in cool-down: new requests go to replica 0 only
    before = st["remote/1/requests"]
    assert remote(samples[:2]).valid.all() and remote.replica_stats()["remote/1/requests"] == before
    time.sleep(1.05)  # after the cool-down it is tried again (and fails over again)
    assert remote(samples[:2]).valid.all() and remote.replica_stats()["remote/1/requests"] == before + 1
    # the health check names the dead replica and goes on with the other
    assert remote.check()["ready"]
    assert f"replica {two[1].url} is not answering /health" in capsys.readouterr().err
    remote.pop_stats()
    two[0].stop()
    res = remote(samples[:3])
    assert not res.valid.any() and np.isnan(res.values).all()
    assert all("all 2 replicas failed" in r and two[0].url in r and two[1].url in r for r in res.reasons)
    popped = remote.pop_stats()
    assert popped["failed_requests"] == 2 and popped["requests"] == 2 * 2 * 2  # 2 replicas x (1 + retries)
    with pytest.raises(RewardServiceError, match="none of the 2 reward service replicas is ready") as e:
        remote.check()
    assert two[0].url in str(e.value) and two[1].url in str(e.value)


def test_an_erroring_replica_fails_over_to_a_healthy_one(samples):
    servers = [ServerThread(create_app(Broken(), "x")), ServerThread(create_app(DurationScorer(), "x"))]
    try:
        remote = RemoteScorer(",".join(s.url for s in servers), batch_size=2, retries=0, cooldown_s=60)
        res = remote(samples)
        assert res.valid.all()
        st = remote.replica_stats()
        assert st["remote/0/errors"] >= 1 and st["remote/0/cooling_down"] == 1.0 and st["remote/1/errors"] == 0
        assert st["remote/1/requests"] == 4  # each of the 4 requests scored by replica 1
    finally:
        for s in servers:
            s.stop()


def test_health_check_warns_for_a_dead_replica_and_fails_only_when_none_is_up(two, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    remote = RemoteScorer([two[0].url, dead, two[1].url])
    assert remote.check()["ready"]
    err = capsys.readouterr().err
    assert f"replica {dead} is not answering /health" in err and two[0].url not in err
    assert remote.replica_stats()["remote/1/cooling_down"] == 1.0
    with pytest.raises(RewardServiceError, match=f"reward service {dead} is not answering /health"):
        RemoteScorer(dead).check()  # one url: as before


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://a:1,,http://b:2", "entry 1 is empty"),
        ("http://a:1,", "entry 1 is empty"),
        (["http://a:1", "ftp://b:2"], "must start with http:// or https://, got 'ftp://b:2'"),
        (["http://a:1", "http://a:1/"], "lists 'http://a:1' twice"),
        ("http://a:1, http://b:2,http://a:1", "lists 'http://a:1' twice"),
        ([], "at least one"),
        (["http://a:1", 3], "entries must be strings"),
        (8001, "must be an http(s) URL"),
        ("ftp://x", "must start with http"),
    ],
)
def test_url_kwarg_is_validated(url, message):
    with pytest.raises(ScorerConfigError) as e:
        check_scorer_kwargs(RemoteScorer, {"url": url}, "rewards.cer")
    assert str(e.value).startswith("rewards.cer.kwargs.url: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_url_kwarg_accepts_lists_and_comma_separated_strings_from_the_config():
    from rl.config import DEFAULT_CONFIG, load_config

    for override in ("rewards.x.kwargs.url=http://a:1,https://b:2/", "rewards.x.kwargs.url=[http://a:1, https://b:2]"):
        cfg, _ = load_config(DEFAULT_CONFIG, ["rewards.x.scorer=remote", override])
        assert RemoteScorer(**cfg.rewards["x"].kwargs).urls == ["http://a:1", "https://b:2"]
    assert RemoteScorer("http://a:1/").urls == ["http://a:1"]
