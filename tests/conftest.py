"""Shared fixtures: a tiny random GLM-TTS checkpoint in the upstream layout, built once per test session."""

from __future__ import annotations

import contextlib
import importlib.machinery
import subprocess
import sys
import types
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_MANIFEST = REPO / "configs" / "data" / "tiny" / "manifest.jsonl"
INDEXTTS_MIRROR = Path("/work/.mirror/index-tts+index-tts/repo")  # a git mirror of index-tts/index-tts


def indextts_mirror_files(git_args: list[str]) -> list[str]:
    """`git ls-tree` of the index-tts mirror's HEAD (git_args: paths to list)."""
    out = subprocess.run(
        ["git", "-C", str(INDEXTTS_MIRROR), "ls-tree", "-r", "--name-only", "HEAD", *git_args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


@contextlib.contextmanager
def indextts_sources(
    root: Path, files: Iterable[str], packages: Iterable[str] = (), stubs: dict[str, types.ModuleType] | None = None
) -> Iterator[Path]:
    """The public index-tts code, which no package index has, importable from the git mirror: `files` copied into
    `root`, `packages` given empty __init__.py files, `stubs` (stand-ins for what this environment lacks, e.g.
    torchaudio) put into sys.modules where missing, `root` on sys.path. All of it is undone on exit, the imported
    `indextts` modules dropped. Skips the caller without the mirror (CI machines have none)."""
    if not (INDEXTTS_MIRROR / "HEAD").exists() and not (INDEXTTS_MIRROR / ".git").exists():
        pytest.skip(f"no index-tts git mirror at {INDEXTTS_MIRROR}")
    for rel in files:
        text = subprocess.run(
            ["git", "-C", str(INDEXTTS_MIRROR), "show", f"HEAD:{rel}"], capture_output=True, text=True, check=True
        ).stdout
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for pkg in packages:
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").touch()
    stubs = stubs or {}
    for name, mod in stubs.items():
        if getattr(mod, "__spec__", None) is None:  # importlib.util.find_spec elsewhere must not fail on it
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    added = [k for k in stubs if k not in sys.modules]
    sys.modules.update({k: stubs[k] for k in added})
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for k in added + [m for m in sys.modules if m == "indextts" or m.startswith("indextts.")]:
            sys.modules.pop(k, None)


@pytest.fixture(scope="session")
def tiny_records():
    from rollouts.manifest import read_manifest

    return read_manifest(TINY_MANIFEST)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_records):
    from policies.tiny import write_tiny_checkpoint

    texts = [t for r in tiny_records for t in (r.prompt_text, r.target_text)]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-glmtts", texts, seed=0)


def run_config(tmp_path: Path, ckpt: Path, *extra: str) -> list[str]:
    """Overrides for a fast training run on the shipped tiny prompts."""
    return [
        f"policy.ckpt_dir={ckpt}",
        f"data.manifest={TINY_MANIFEST}",
        f"train.output_dir={tmp_path / 'run'}",
        "sampling.max_token_text_ratio=4",
        "sampling.max_new_tokens=48",
        "wandb.enabled=false",
        "train.samples_every=0",
        *extra,
    ]


def train_shipped(config: str, out: Path, ckpt: Path, *extra: str) -> list[dict]:
    """Train configs/<config> into `out` from the checkpoint `ckpt` (no wandb, no samples); its metrics rows."""
    import json

    from rl.config import load_config
    from rl.trainer import train

    overrides = [f"policy.ckpt_dir={ckpt}", f"train.output_dir={out}", "wandb.enabled=false", "train.samples_every=0"]
    cfg, d = load_config(REPO / "configs" / config, [*overrides, *extra])
    train(cfg, d, progress=False)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (tiny models are op-overhead bound: one thread is ~20x faster on a
    shared 2-core CPU); the count is restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reward_models(tmp_path_factory):
    """Every tiny reward model (Paraformer, Whisper, emotion2vec, AST, WavLM + ECAPA) in its real format."""
    from rewards.tiny import write_all

    return write_all(tmp_path_factory.mktemp("reward_models"))


def audio_sample(
    text="今天天气很好", seconds=1.0, rate=24000, seed=0, emotion=None, prompt_seconds=1.2, uttid="u", **kw
):
    import numpy as np

    from rewards.base import Sample

    rng = np.random.default_rng(seed)
    prompt = 0.1 * np.random.default_rng(1000 + hash(uttid) % 1000).standard_normal(int(prompt_seconds * rate))
    defaults = dict(
        uttid=uttid,
        group_id=0,
        target_text=text,
        prompt_text="你好",
        codes=np.zeros(int(25 * seconds), np.int64),
        finished=True,
        prompt_codes=np.zeros(20, np.int64),
        emotion=emotion,
        duration_s=float(seconds),
        prompt_duration_s=20 / 25,
        audio=(0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32),
        sample_rate=rate,
        prompt_audio=prompt.astype(np.float32),
        prompt_sample_rate=rate,
    )
    defaults.update(kw)
    return Sample(**defaults)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1 in a background thread (a real socket, real HTTP)."""

    def __init__(self, app):
        import threading
        import time

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "server did not start"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def real_recording():
    """A real English recording at 16 kHz (moonshine-voice's assets/beckett.wav, "Ever tried. Ever failed. ..."),
    as (float32 samples, rate); the test skips, saying why, when the package is not installed."""
    import importlib.util

    import numpy as np

    from rollouts.audio import read_wav

    spec = importlib.util.find_spec("moonshine_voice")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("moonshine-voice (its real recordings; `make test` installs it) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / "beckett.wav"
    wav, rate = read_wav(path)
    assert rate == 16000 and len(wav) > 5 * rate
    return wav.astype(np.float32), rate
