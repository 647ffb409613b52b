import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import CONFIG_DIR, DEFAULT_CONFIG, Config, load_config
from rl.configlib import ConfigError, describe
from rl.schedules import Schedule

PATHS = "data: {manifest: m.jsonl}\npolicy: {ckpt_dir: ckpt}\n"
BASE = "rewards:\n  duration: {scorer: duration}\n" + PATHS


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_field_has_a_help_line():
    rows = describe(Config)
    assert len(rows) > 40
    assert [k for k, _, h in rows if not h.strip()] == []


def test_yaml_overlays_defaults_and_converts_types(tmp_path):
    p = write(
        tmp_path,
        BASE + "optim:\n  lr: 1e-6\n  betas: [0.9, 0.99]\nsampling:\n  group_size: 4.0\n"
        "loss:\n  eps_low: 0.25\n  eps_high: {kind: linear, start: 0.3, end: 0.5, steps: 1000}\n",
    )
    cfg, derived = load_config(p)
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-6 as a string
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.sampling.group_size == 4 and isinstance(cfg.sampling.group_size, int)
    assert cfg.loss.eps_low == Schedule.from_scalar(0.25)
    assert cfg.loss.eps_high(500) == pytest.approx(0.4)
    assert cfg.sampling.top_k == 25  # untouched default
    assert derived.rows_per_step == 4 and derived.weights == {"duration": 1.0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim:\n  lrr: 1e-5\n", "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        ("optimm:\n  lr: 1e-5\n", "unknown key 'optimm'; did you mean 'optim'"),
        ("loss:\n  eps_hgih: 0.3\n", "did you mean 'loss.eps_high'"),
        (
            "rewards:\n  cer: {scorer: cer, wieght: 1}\n",
            "unknown key 'rewards.cer.wieght'; did you mean 'rewards.cer.weight'",
        ),
        ("sampling:\n  top_k: many\n", "sampling.top_k: expected an integer, got 'many'"),
        ("loss:\n  agg: mean\n", "loss.agg: expected one of 'token_mean', 'seq_mean', 'seq_sum_const'"),
        ("sampling:\n  ras: maybe\n", "sampling.ras: expected true or false"),
        ("sampling:\n  group_size: 1\n", "sampling.group_size must be >= 2"),
        ("loss:\n  eps_low: {kind: linear, start: 0.2}\n", "loss.eps_low: a linear schedule needs `end`"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text, message):
    p = write(tmp_path, (PATHS if text.startswith("rewards:") else BASE) + text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value)
    assert str(p) in str(e.value)


def test_cli_overrides_convert_and_validate(tmp_path):
    p = write(tmp_path, BASE)
    cfg, d = load_config(
        p,
        [
            "optim.lr=3e-6",
            "sampling.ras=false",
            "dynamic_sampling.keys=[duration]",
            "loss.eps_high.kind=linear",
            "loss.eps_high.end=0.5",
            "loss.eps_high.steps=10",
            "rewards.cer.scorer=duration",
            "rewards.cer.weight=0.5",
            "rewards.cer.kwargs.tolerance=2.5",
            "policy.ckpt_dir=123",
        ],
    )
    assert cfg.optim.lr == 3e-6 and cfg.sampling.ras is False
    assert cfg.dynamic_sampling.keys == ["duration"]
    assert cfg.loss.eps_high(10) == pytest.approx(0.5)
    assert cfg.rewards["cer"].weight == 0.5 and cfg.rewards["cer"].kwargs == {"tolerance": 2.5}
    assert cfg.policy.ckpt_dir == str(Path.cwd() / "123")  # a path given with --set: relative to the current dir
    assert Path(cfg.data.manifest).is_absolute()  # a path written in a file: relative to the file, made absolute
    assert d.weights == {"duration": 1.0, "cer": 0.5}
    for bad, msg in [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("optim.lr", "section.key=value"),
        ("optim.lr.x=1", "is a value, not a section"),
        ("dynamic_sampling.keys=[emo]", "dynamic_sampling.keys names rewards without weight"),
        ("sampling.temperature=-1", "sampling.temperature must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace(".", r"\.")):
            load_config(p, [bad])


def test_rewards_are_required_and_weights_not_all_zero(tmp_path):
    with pytest.raises(ConfigError, match="at least one reward"):
        load_config(write(tmp_path, "data: {manifest: m.jsonl}\npolicy: {ckpt_dir: c}\n"))
    with pytest.raises(ConfigError, match="every weight is 0"):
        load_config(write(tmp_path, BASE.replace("{scorer: duration}", "{scorer: duration, weight: 0}")))
    with pytest.raises(ConfigError, match="line 6: key 'loss' is given twice"):
        load_config(write(tmp_path, BASE + "loss: {kl_coef: 0.1}\nloss: {agg: seq_mean}\n"))


def test_config_is_immutable(tmp_path):
    cfg, _ = load_config(write(tmp_path, BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_derived_values(tmp_path):
    cfg, d = load_config(
        write(tmp_path, BASE),
        ["loss.ratio_anchor=ref", "optim.minibatches=2", "optim.ppo_epochs=2", "data.prompts_per_step=3"],
    )
    assert d.needs_reference and d.updates_per_step == 4 and d.rows_per_step == 24


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rl.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_config_check_and_show(tmp_path):
    good = run_cli("config", "check", str(CONFIG_DIR / "tiny.yaml"))
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout
    bad = write(tmp_path, BASE + "loss:\n  eps_hgih: 0.3\n", "bad.yaml")
    out = run_cli("config", "check", str(bad))
    assert out.returncode == 2
    assert "unknown key 'loss.eps_hgih'" in out.stderr and "loss.eps_high" in out.stderr
    shipped = run_cli("config", "check", str(CONFIG_DIR.parent / "tests" / "data" / "bad_typo.yaml"))  # README's
    assert shipped.returncode == 2 and "did you mean 'loss.eps_high'" in shipped.stderr, shipped.stderr
    shown = run_cli("config", "show", str(CONFIG_DIR / "tiny.yaml"), "--set", "optim.lr=2e-5")
    assert shown.returncode == 0 and "lr: 2.0e-05" in shown.stdout and "# derived" in shown.stdout
    # what `show` prints is itself a valid config that resolves to the same values
    again = write(tmp_path, shown.stdout, "again.yaml")
    assert load_config(again)[0] == load_config(CONFIG_DIR / "tiny.yaml", ["optim.lr=2e-5"])[0]


def test_yaml_booleans_spelled_like_a_choice_are_that_choice(tmp_path):
    # YAML 1.1 reads `off` as false: `mode: off` must still mean the choice "off"
    cfg, _ = load_config(write(tmp_path, BASE + "dynamic_sampling:\n  mode: off\n"))
    assert cfg.dynamic_sampling.mode == "off"
    cfg, _ = load_config(write(tmp_path, BASE), ["dynamic_sampling.mode=off"])
    assert cfg.dynamic_sampling.mode == "off"


def test_every_shipped_config_loads_and_validates():
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg, d = load_config(f)
        assert cfg.rewards and d.rows_per_step >= 2, f
        header = []
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        assert any(
            f"ttsrl train {f.relative_to(CONFIG_DIR.parent)}" in h or (f.name == "tiny.yaml" and "`ttsrl train`" in h)
            for h in header
        ), f"{f}: the opening comment must give its launch command"


def test_ablation_configs_hold_the_reports_settings():
    abl = CONFIG_DIR / "ablations"
    recipe, _ = load_config(CONFIG_DIR / "glmtts_grpo.yaml")
    assert recipe.sampling.group_size == 8 and recipe.optim.lr == 1e-6 and recipe.dynamic_sampling.max_tries == 3
    assert {k: r.weight for k, r in recipe.rewards.items()} == {"cer": 1.0, "sim": 0.1}
    assert (
        recipe.loss.eps_low(0),
        recipe.loss.eps_high(0),
        recipe.loss.eps_low(1000),
        recipe.loss.eps_high(1000),
    ) == pytest.approx((0.2, 0.3, 0.3, 0.5))
    table4 = {
        "no_clip_higher": (0.2, 0.2, "off"),
        "clip_higher": (0.2, 0.3, "off"),
        "dynamic_sampling": (0.2, 0.2, "reroll"),
    }
    for name, (low, high, mode) in table4.items():
        cfg, _ = load_config(abl / f"{name}.yaml")
        for step in (0, 500, 1000):
            assert (cfg.loss.eps_low(step), cfg.loss.eps_high(step)) == pytest.approx((low, high)), name
        assert cfg.dynamic_sampling.mode == mode, name
    table5 = {
        "schedule_frozen": (1.0, 0.3, 0.2),
        "schedule_T1.5_eh0.5_el0.4": (1.5, 0.5, 0.4),
        "schedule_T2_eh1.0_el0.4": (2.0, 1.0, 0.4),
        "schedule_T3_eh1.0_el0.4": (3.0, 1.0, 0.4),
    }
    for name, end in table5.items():  # from T 1, eps_high 0.3, eps_low 0.2 to these at the last step
        cfg, _ = load_config(abl / f"{name}.yaml")
        s = cfg.train.steps
        start = (cfg.sampling.temperature(0), cfg.loss.eps_high(0), cfg.loss.eps_low(0))
        assert start == pytest.approx((1.0, 0.3, 0.2))
        assert (cfg.sampling.temperature(s), cfg.loss.eps_high(s), cfg.loss.eps_low(s)) == pytest.approx(end), name
    for w in (2, 5, 10):  # table 6
        cfg, _ = load_config(abl / f"laughter_w{w}.yaml")
        assert cfg.rewards["laughter"].weight == w and cfg.rewards["laughter"].scorer == "laughter"
        assert cfg.rewards["cer"].weight == 1.0 and cfg.rewards["sim"].weight == 0.1


def test_base_chains_resolve_paths_per_file_and_refuse_cycles(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, BASE + "train: {steps: 7, output_dir: runs/a}\n", "base.yaml")
    child = write(tmp_path / "sub", "base: ../base.yaml\ntrain: {steps: 9}\ndata: {manifest: m2.jsonl}\n", "child.yaml")
    cfg, _ = load_config(child)
    assert cfg.train.steps == 9 and cfg.rewards["duration"].weight == 1.0
    assert cfg.train.output_dir == str(tmp_path / "runs" / "a")  # relative to the base file
    assert cfg.data.manifest == str(tmp_path / "sub" / "m2.jsonl")  # relative to the child file
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.top_k=-1", "top_k must be >= 0"),
        ("sampling.top_p=0", "top_k must be >= 0 and top_p in \\(0, 1\\], got 25, 0.0"),
        ("sampling.ras_tau=0", "ras_window must be >= 1 and ras_tau > 0"),
    ],
)
def test_sampling_settings_are_checked_by_the_sampler_s_own_rules(override, message):
    with pytest.raises(ConfigError, match=f"sampling: {message}"):
        load_config(DEFAULT_CONFIG, [override])


def test_vllm_backend_refuses_top_k_with_top_p():
    base = ["sampling.backend=vllm", "sampling.ras=false"]
    with pytest.raises(ConfigError, match="applies top_p inside the renormalised top_k"):
        load_config(DEFAULT_CONFIG, base + ["sampling.top_k=25", "sampling.top_p=0.8"])
    load_config(DEFAULT_CONFIG, base + ["sampling.top_k=25", "sampling.top_p=1.0"])
    load_config(DEFAULT_CONFIG, base + ["sampling.top_k=0", "sampling.top_p=0.8"])
