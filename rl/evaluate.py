"""`ttsrl eval`: synthesise a seed-tts-eval meta file with a checkpoint and report CER/WER, SIM and emotion accuracy.

Meta file (seed-tts-eval): one item per line, `utt|prompt_text|prompt_wav|target_text`, paths relative to the
file. Optional fields after those: seed-tts-eval's ground-truth wav (`...|target_text|gt_wav`, recognised by its
audio file extension; kept in the report, not used by any metric) and the target emotion (an emotion2vec label
name such as `happy`, or its index) for the emotion accuracy: `...|target_text|happy` or `...|gt.wav|happy`.
Lines that are empty or start with `#` are skipped.

For every item: the voice prompt goes through the GLM-TTS front end (speech tokenizer, CAMPPlus embedding, 24 kHz
prompt mel; `rollouts/prepare.py`), the policy samples one utterance (the upstream inference sampler: RAS,
top-k 25, top-p 0.8, T 1; seeded per item), Token2Wav vocodes it and the wav is written to OUT/wavs/<utt>.wav
(uttid made file-safe).
The LM reads the texts normalised as in training (rollouts/text.py); a long target goes piece by piece as upstream's
generate_long (rl/long_text.py). The metrics score the raw target text. Then, as seed-tts-eval does:
    CER (zh, Paraformer) / WER (en, Whisper)   mean over items of the per-item rate, x 100; plus the
                                               corpus-level rate (all edits / all reference tokens) x 100
    SIM                                        mean cosine of WavLM + ECAPA embeddings, generated vs prompt wav
    emotion accuracy (CV3-eval)                fraction of items with a target emotion whose emotion2vec argmax
                                               is that emotion
An item that fails anywhere (front end, sampling, vocoding, a scorer) is listed with its stage and reason under
`failed` and left out of that metric's mean; the report says how many items each figure covers.

Outputs: OUT/eval.json (config, metrics, every item) and OUT/eval.md (a table). `--compare A B` prints the two
runs' metrics side by side (A and B are eval output dirs, or checkpoints that are evaluated first).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rewards.emotion import LABELS

if TYPE_CHECKING:
    from rollouts.text import LMTexts

REPO = Path(__file__).resolve().parents[1]
TINY_MODELS = REPO / ".cache" / "tiny-eval-models"


class MetaError(ValueError):
    """A bad line in a meta file (the message names the file, line and field)."""


@dataclass(frozen=True)
class MetaItem:
    utt: str
    prompt_text: str
    prompt_wav: Path
    target_text: str
    emotion: int | None  # emotion2vec label index; None = no target
    where: str  # "file:line"
    gt_wav: str | None = None  # seed-tts-eval's ground-truth recording (not used by any metric)


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


def _emotion(value: str, where: str) -> int:
    e = value.strip().lower()
    if e.lstrip("-").isdigit():
        emotion = int(e)
    elif e in LABELS:
        emotion = LABELS.index(e)
    else:
        raise MetaError(f"{where}: field 'emotion': unknown label {e!r}; expected one of {LABELS[:-1]}")
    if not 0 <= emotion < len(LABELS) - 1:
        raise MetaError(f"{where}: field 'emotion': label index {emotion} is not in 0..{len(LABELS) - 2}")
    return emotion


def read_meta(path: str | Path) -> list[MetaItem]:
    path = Path(path)
    if not path.is_file():
        raise MetaError(f"meta file not found: {path}")
    items, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{path}:{n}"
        parts = line.rstrip("\n").split("|")
        if len(parts) not in (4, 5, 6):
            raise MetaError(
                f"{where}: expected utt|prompt_text|prompt_wav|target_text[|gt_wav][|emotion], got {len(parts)} fields"
            )
        utt, prompt_text, wav, target = (p.strip() for p in parts[:4])
        for name, value in (("utt", utt), ("prompt_text", prompt_text), ("prompt_wav", wav), ("target_text", target)):
            if not value:
                raise MetaError(f"{where}: field '{name}' is empty")
        if utt in seen:
            raise MetaError(f"{where}: field 'utt': '{utt}' is already used on line {seen[utt]}")
        seen[utt] = n
        wav_path = Path(wav) if Path(wav).is_absolute() else path.parent / wav
        if not wav_path.is_file():
            raise MetaError(f"{where}: field 'prompt_wav': file not found: {wav_path}")
        extra = [p.strip() for p in parts[4:]]
        gt_wav = emotion = None
        if extra and extra[0].lower().endswith(AUDIO_SUFFIXES):
            gt_wav = extra.pop(0)
        if len(extra) > 1:  # six fields, the fifth no audio file
            raise MetaError(
                f"{where}: field 'gt_wav': a 6-field line is utt|prompt_text|prompt_wav|target_text|"
                f"gt_wav|emotion, with an audio file in field 5 (got {parts[4].strip()!r})"
            )
        if extra and extra[0]:
            emotion = _emotion(extra[0], where)
        items.append(MetaItem(utt, prompt_text, wav_path, target, emotion, where, gt_wav))
    if not items:
        raise MetaError(f"{path}: no items")
    return items


@dataclass
class EvalModels:
    """Local model locations; a metric whose model is not given is not measured (and says so)."""

    frontend_dir: str | None  # speech_tokenizer/ + frontend/campplus.onnx (GLM-TTS's prompts need them; VoxCPM not)
    asr_dir: str | None = None  # Paraformer (zh) or Whisper (en) directory
    sim_checkpoint: str | None = None  # wavlm_large_finetune.pth
    sim_wavlm_cfg: dict | None = None  # WavLM architecture overrides (tiny models only)
    emotion_dir: str | None = None  # emotion2vec+ directory


def tiny_models(lang: str, meta_items: list[MetaItem] | None = None, root: Path = TINY_MODELS) -> EvalModels:
    """Tiny random evaluation models in their real formats, built on first use under `root` (for trying the
    command end to end; their scores mean nothing)."""
    from rewards.tiny import write_all
    from rollouts.tiny_frontend import write_tiny_frontend

    stamp = root / "models.json"
    if not stamp.is_file():
        chars = sorted({c for it in meta_items or [] for c in it.target_text if not c.isspace()})
        paths = write_all(root, chars or None)
        write_tiny_frontend(root / "frontend")
        stamp.write_text(json.dumps(paths, indent=1))
    paths = json.loads(stamp.read_text())
    return EvalModels(
        frontend_dir=str(root / "frontend"),
        asr_dir=paths["paraformer_dir"] if lang == "zh" else paths["whisper_dir"],
        sim_checkpoint=paths["sv_checkpoint"],
        sim_wavlm_cfg=paths["wavlm_cfg"],
        emotion_dir=paths["emotion_dir"],
    )


# ---- checkpoints -----------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    label: str  # what the report calls it
    glmtts_dir: Path  # the model directory: GLM-TTS's llm/, vq32k-phoneme-tokenizer/, flow/, hift/; or VoxCPM's
    policy: object  # GLMTTSPolicy, or a policy with its own `synthesize` (VoxCPMPolicy, IndexTTS2Policy)
    text_normalize: str = "upstream"  # how the run's texts were normalised (data.text_normalize)


def load_for_eval(
    path: str | Path, device: str = "cpu", dtype: str = "float32", *, trust_remote_code: bool = False
) -> LoadedCheckpoint:
    """A GLM-TTS checkpoint directory (llm/ ...) or a ttsrl run / checkpoint directory (its policy on top of the
    GLM-TTS checkpoint the run trained). A run saved with policy.trust_remote_code loads only when the caller
    allows remote code (`--trust-remote-code`): a saved config never turns it on by itself."""
    import yaml
    from safetensors.torch import load_file

    from policies.glmtts import GLMTTSPolicy
    from rl.checkpoint import find_checkpoint
    from rl.config import config_from_data
    from rl.trainer import DTYPES

    path = Path(path)
    if (path / "llm").is_dir():
        policy = GLMTTSPolicy.from_pretrained(path, dtype=DTYPES[dtype], device=device)
        return LoadedCheckpoint(str(path), path, policy)
    if (path / "config.yaml").is_file() and (path / "gpt.pth").is_file():  # IndexTTS2's released layout
        from policies.indextts2 import IndexTTS2Policy

        policy = IndexTTS2Policy.from_pretrained(path, dtype=DTYPES[dtype], device=device)
        return LoadedCheckpoint(str(path), path, policy, "none")  # it normalises its texts itself
    if _is_voxcpm(path):
        from policies.voxcpm import VoxCPMPolicy

        return LoadedCheckpoint(
            str(path), path, VoxCPMPolicy.from_pretrained(path, dtype=DTYPES[dtype], device=device), "voxcpm"
        )
    try:
        ckpt = find_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: neither a GLM-TTS checkpoint (no llm/), a VoxCPM one (config.json, architecture voxcpm2), an "
            f"IndexTTS2 one (config.yaml, gpt.pth) nor a ttsrl run or checkpoint (no trainer_state.json, no "
            f"checkpoints/step-*/)"
        ) from None
    cfg, _ = config_from_data(yaml.safe_load((ckpt / "config.yaml").read_text()), str(ckpt / "config.yaml"))
    if cfg.policy.trust_remote_code and not trust_remote_code:
        raise MetaError(
            f"{ckpt / 'config.yaml'}: the run was trained with policy.trust_remote_code: true, which runs "
            f"the Python code shipped in the checkpoint's tokenizer directory; pass --trust-remote-code "
            f"to allow it"
        )
    base = Path(cfg.policy.ckpt_dir)
    if cfg.policy.kind not in ("glmtts", "voxcpm", "indextts2"):
        raise MetaError(
            f"{ckpt}: a {cfg.policy.kind} run trains GLM-TTS's flow: write it in upstream's layout with `ttsrl export "
            f"{path} OUT`, then evaluate OUT"
        )
    from policies.base import policy_class

    policy = policy_class(cfg.policy.kind).from_pretrained(
        base,
        dtype=DTYPES[dtype],
        device=device,
        lora=cfg.policy.lora,
        trust_remote_code=cfg.policy.trust_remote_code,
        config=cfg.policy,
    )
    policy.load_checkpoint_state(load_file(str(ckpt / "policy.safetensors")))
    return LoadedCheckpoint(str(ckpt), base, policy, cfg.data.text_normalize)


def _is_voxcpm(path: Path) -> bool:
    """A VoxCPM checkpoint directory: config.json naming a voxcpm architecture."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return str(json.loads(cfg.read_text()).get("architecture", "")).startswith("voxcpm")
    except (ValueError, OSError, AttributeError):
        return False


# ---- evaluation ------------------------------------------------------------------------------------------------


@dataclass
class ItemResult:
    utt: str
    target_text: str
    gt_wav: str | None = None  # the meta file's ground-truth recording, when it names one
    wav: str | None = None
    seconds: float | None = None  # generated audio duration
    truncated: bool | None = None  # hit the length limit without the stop token
    hyp: str | None = None  # ASR transcript
    error_rate: float | None = None  # CER (zh) / WER (en) of this item
    edits: int | None = None
    ref_tokens: int | None = None
    sim: float | None = None  # cosine, generated vs prompt
    emotion_target: str | None = None
    emotion_pred: str | None = None
    failed: dict = field(default_factory=dict)  # stage -> reason


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def evaluate(
    ckpt: str | Path,
    meta: str | Path,
    lang: str,
    out_dir: str | Path,
    models: EvalModels,
    *,
    asr_kind: str | None = None,  # "paraformer" | "whisper"; default by lang
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 16,
    flow_steps: int = 10,
    trust_remote_code: bool = False,
    texts: LMTexts | None = None,  # how texts become LM input; default upstream normalisation, no phonemes
) -> dict:
    """Voice prompts through the front end, one seeded sample per item, the metrics (each model loaded only while
    it runs), then eval.json (atomically) and eval.md in `out_dir`."""
    if lang not in ("zh", "en"):
        raise ValueError(f"--lang must be zh or en, got {lang!r}")
    t_start = time.perf_counter()
    items = read_meta(meta)  # before anything is written
    out = Path(out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    results = {it.utt: ItemResult(it.utt, it.target_text, it.gt_wav) for it in items}
    for it in items:
        if it.emotion is not None:
            results[it.utt].emotion_target = LABELS[it.emotion]
    loaded = load_for_eval(ckpt, device=device, trust_remote_code=trust_remote_code)
    own = callable(getattr(loaded.policy, "synthesize", None))  # a policy with its own front end and sampler
    if own:
        audio, rate = _synthesize_own(loaded, items, results, out, texts, seed=seed, batch_size=batch_size)
    else:
        if models.frontend_dir is None:
            raise MetaError("evaluating GLM-TTS needs --frontend DIR (speech_tokenizer/ and frontend/campplus.onnx)")
        prompt_feats = _prompt_features(items, results, models, device)
        rate = token2wav_rate()
        audio = _synthesize(
            loaded,
            items,
            results,
            prompt_feats,
            out,
            texts,
            device=device,
            seed=seed,
            batch_size=batch_size,
            flow_steps=flow_steps,
        )
    ok = [it for it in items if it.utt in audio]
    measured = _measure(_eval_samples(ok, results, audio, rate), results, models, lang, asr_kind, device)
    report = _report(results, ok, measured, lang, time.perf_counter() - t_start)
    report = {
        "ckpt": loaded.label,
        "meta": str(Path(meta).resolve()),
        "lang": lang,
        "seed": seed,
        "flow_steps": None if own else flow_steps,  # GLM-TTS's vocoder steps (VoxCPM's sampler has its own)
        **report,
    }
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    tmp.replace(out / "eval.json")
    (out / "eval.md").write_text(markdown_report(report))
    return report


def _prompt_features(items: list, results: dict, models: EvalModels, device: str) -> dict:
    """1. voice prompts through the front end (each distinct wav once); a failure marks the item failed."""
    from rollouts.prepare import PromptFrontend

    frontend = PromptFrontend.from_dir(models.frontend_dir, device=device)
    prompt_feats: dict[Path, object] = {}
    for it in items:
        if it.prompt_wav in prompt_feats:
            continue
        try:
            prompt_feats[it.prompt_wav] = frontend(it.prompt_wav)
        except (ValueError, OSError, RuntimeError) as e:
            prompt_feats[it.prompt_wav] = e
    for it in items:
        if isinstance(prompt_feats[it.prompt_wav], Exception):
            results[it.utt].failed["frontend"] = f"{it.where}: {prompt_feats[it.prompt_wav]}"
    return prompt_feats


def _synthesize(
    loaded,
    items: list,
    results: dict,
    prompt_feats: dict,
    out: Path,
    texts,
    *,
    device: str,
    seed: int,
    batch_size: int,
    flow_steps: int,
) -> dict[str, np.ndarray]:
    """2. synthesis: one sample per item, batched, seeded per item; wavs written under out/wavs."""
    from policies.sampling import SamplingParams
    from rl.long_text import LongJob, synthesize_long
    from rollouts.audio import write_wav
    from rollouts.paths import inside, safe_stem
    from rollouts.text import LMTexts
    from rollouts.token2wav import Token2Wav, VoicePrompt

    policy = loaded.policy
    policy.model.eval()
    token2wav = Token2Wav.from_pretrained(loaded.glmtts_dir, device=device, n_timesteps=flow_steps)
    params = SamplingParams(temperature=1.0, top_k=25, top_p=0.8, ras=True)
    todo = [k for k, it in enumerate(items) if not results[it.utt].failed]
    audio: dict[str, np.ndarray] = {}
    lm = texts if texts is not None else LMTexts()  # the texts as the LM reads them; metrics use the raw ones
    enc = policy.encode_text
    for start in range(0, len(todo), batch_size):
        jobs = []
        for k in todo[start : start + batch_size]:
            it, pf = items[k], prompt_feats[items[k].prompt_wav]
            pieces = [enc(p) for p in lm.target_chunks(it.target_text)]  # upstream generate_long's pieces
            jobs.append(
                LongJob(
                    k,
                    enc(lm.prompt(it.prompt_text) + " "),
                    pieces,
                    VoicePrompt(pf.tokens, pf.feat, pf.embedding),
                    it.where,
                )
            )
        synthesize_long(policy, token2wav, jobs, params, seed=seed)
        for job in jobs:
            res = results[items[job.key].utt]
            res.truncated = job.truncated
            if job.failed:
                res.failed.update(job.failed)
                continue
            wav = np.concatenate(job.audio)
            audio[res.utt] = wav
            res.seconds = len(wav) / token2wav_rate()
            res.wav = str(inside(out / "wavs", f"{safe_stem(res.utt)}.wav"))  # the utt stays in eval.json
            write_wav(res.wav, wav, token2wav_rate())

    return audio


def _synthesize_own(
    loaded, items: list, results: dict, out: Path, texts, *, seed: int, batch_size: int
) -> tuple[dict[str, np.ndarray], int]:
    """2. synthesis by a policy with its own front end and evaluation sampler (`policy.synthesize`: VoxCPM's
    released ODE and argmax stop, IndexTTS2's released distribution): the prompt wav and texts per item, batched,
    seeded per item; wavs under out/wavs.
    Returns (audio per utt, sample rate)."""
    from rollouts.audio import write_wav
    from rollouts.paths import inside, safe_stem
    from rollouts.text import LMTexts
    from rollouts.types import PromptRecord

    policy = loaded.policy
    lm = texts if texts is not None else LMTexts(loaded.text_normalize)
    rate = int(policy.sample_rate)
    prompts: dict[int, object] = {}
    for k, it in enumerate(items):
        rec = PromptRecord(
            it.utt,
            lm.prompt(it.prompt_text),
            lm.target(it.target_text),
            None,
            None,
            None,
            str(it.prompt_wav),
            it.emotion,
            it.where,
        )
        try:
            prompts[k] = policy.prompt_input(rec)
        except (ValueError, OSError) as e:
            results[it.utt].failed["frontend"] = str(e)
    audio: dict[str, np.ndarray] = {}
    todo = sorted(prompts)
    for start in range(0, len(todo), batch_size):
        keys = todo[start : start + batch_size]
        for k, (wav, truncated) in zip(keys, policy.synthesize([prompts[k] for k in keys], seed=seed, keys=keys)):
            res = results[items[k].utt]
            res.truncated = truncated
            audio[res.utt] = wav
            res.seconds = len(wav) / rate
            res.wav = str(inside(out / "wavs", f"{safe_stem(res.utt)}.wav"))
            write_wav(res.wav, wav, rate)
    return audio, rate


def _eval_samples(ok: list, results: dict, audio: dict, rate: int) -> list:
    from rewards.base import Sample
    from rollouts.audio import read_wav

    prompt_wavs = {p: read_wav(p) for p in {it.prompt_wav for it in ok}}
    return [
        Sample(
            uttid=it.utt,
            group_id=k,
            target_text=it.target_text,
            prompt_text=it.prompt_text,
            codes=np.zeros(0, np.int64),
            finished=not results[it.utt].truncated,
            prompt_codes=np.zeros(0, np.int64),
            emotion=it.emotion,
            duration_s=len(audio[it.utt]) / rate if audio[it.utt] is not None else math.nan,
            prompt_duration_s=len(prompt_wavs[it.prompt_wav][0]) / prompt_wavs[it.prompt_wav][1],
            audio=audio[it.utt],
            sample_rate=rate,
            prompt_audio=prompt_wavs[it.prompt_wav][0],
            prompt_sample_rate=prompt_wavs[it.prompt_wav][1],
        )
        for k, it in enumerate(ok)
    ]


def _measure(samples: list, results: dict, models: EvalModels, lang: str, asr_kind: str | None, device: str) -> dict:
    """3. metrics, each model loaded only while it runs; returns which were measured."""
    from rewards.cer import edit_counts

    measured = {"cer": False, "sim": False, "emotion": False}
    if models.asr_dir and samples:
        from rewards.cer import CERScorer

        measured["cer"] = True
        kind = asr_kind or ("paraformer" if lang == "zh" else "whisper")
        scorer = CERScorer(
            paraformer_dir=models.asr_dir if kind == "paraformer" else None,
            whisper_dir=models.asr_dir if kind == "whisper" else None,
            lang=lang,
            device=device,
        )
        hyps, _, reasons = scorer.transcribe(samples)
        for s, hyp, why in zip(samples, hyps, reasons):
            res = results[s.uttid]
            if why is not None:
                res.failed["asr"] = why
                continue
            res.hyp = hyp
            try:
                res.edits, res.ref_tokens = edit_counts(s.target_text, hyp, lang)
                res.error_rate = res.edits / res.ref_tokens
            except ValueError as e:
                res.failed["asr"] = str(e)
        del scorer
    if models.sim_checkpoint and samples:
        from rewards.sim import SimScorer

        measured["sim"] = True
        sc = SimScorer(models.sim_checkpoint, models.sim_wavlm_cfg, device=device)(samples)
        for j, s in enumerate(samples):
            if sc.valid[j]:
                results[s.uttid].sim = float(sc.sub_scores["cos"][j])
            else:
                results[s.uttid].failed["sim"] = sc.reasons[j]
    emo_samples = [s for s in samples if s.emotion is not None]
    if models.emotion_dir and emo_samples:
        from rewards.emotion import EMO_RATE, EmotionScorer
        from rollouts.audio import resample

        measured["emotion"] = True
        scorer = EmotionScorer(models.emotion_dir, device=device)
        try:
            probs = scorer.probabilities([resample(s.audio, s.sample_rate, EMO_RATE) for s in emo_samples])
        except (ValueError, RuntimeError) as e:
            probs = None
            for s in emo_samples:
                results[s.uttid].failed["emotion"] = f"{type(e).__name__}: {e}"
        for s, p in zip(emo_samples, [] if probs is None else probs):
            results[s.uttid].emotion_pred = LABELS[int(np.argmax(p))]

    return measured


def _report(results: dict, ok: list, measured: dict, lang: str, wall_seconds: float) -> dict:
    """4. the report's metrics, failures and items."""
    rows = list(results.values())
    rates = [r.error_rate for r in rows if r.error_rate is not None]
    edits = sum(r.edits for r in rows if r.edits is not None)
    refs = sum(r.ref_tokens for r in rows if r.ref_tokens is not None)
    sims = [r.sim for r in rows if r.sim is not None]
    emo = [r for r in rows if r.emotion_target is not None and r.emotion_pred is not None]
    metric = "cer" if lang == "zh" else "wer"
    metrics = {
        "items": len(rows),
        "synthesised": len(ok),
        "truncated": sum(bool(r.truncated) for r in rows),
        "failed": sum(bool(r.failed) for r in rows),
        f"{metric}": None if not rates else 100.0 * float(np.mean(rates)),
        f"{metric}_corpus": None if not refs else 100.0 * edits / refs,
        f"{metric}_n": len(rates),
        "sim": _mean(sims),
        "sim_n": len(sims),
        "emotion_acc": None if not emo else float(np.mean([r.emotion_pred == r.emotion_target for r in emo])),
        "emotion_n": len(emo),
        "audio_seconds": float(sum(r.seconds or 0.0 for r in rows)),
        "wall_seconds": wall_seconds,
    }
    return {
        "measured": measured,
        "metrics": metrics,
        "failed": [{"utt": r.utt, **{"stage": s, "reason": why}} for r in rows for s, why in r.failed.items()],
        "items": [asdict(r) for r in rows],
    }


def token2wav_rate() -> int:
    from rollouts.audio import SAMPLE_RATE

    return SAMPLE_RATE


# ---- reports ---------------------------------------------------------------------------------------------------


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def metric_rows(report: dict) -> list[tuple[str, float | int | None, int, int | None]]:
    """(label, value, digits, items it covers) of a report's headline figures."""
    m, lang = report["metrics"], report["lang"]
    name = "CER" if lang == "zh" else "WER"
    key = name.lower()
    return [
        (f"{name} (%, mean of items)", m[key], 2, m[key + "_n"]),
        (f"{name} (%, corpus)", m[key + "_corpus"], 2, m[key + "_n"]),
        ("SIM (cosine)", m["sim"], 3, m["sim_n"]),
        ("emotion accuracy", m["emotion_acc"], 3, m["emotion_n"]),
        ("items", m["items"], 0, None),
        ("truncated (no stop token)", m["truncated"], 0, None),
        ("failed items", m["failed"], 0, None),
    ]


def markdown_report(report: dict) -> str:
    lines = [
        f"# Evaluation of {report['ckpt']}",
        "",
        f"meta `{report['meta']}`, lang {report['lang']}, seed {report['seed']}"
        + (f", {report['flow_steps']} flow steps" if report.get("flow_steps") else ""),
        "",
        "| metric | value | items |",
        "|---|---|---|",
    ]
    for label, value, digits, n in metric_rows(report):
        lines.append(f"| {label} | {_fmt(value, digits)} | {_fmt(n)} |")
    not_measured = [k for k, v in report["measured"].items() if not v]
    if not_measured:
        lines += ["", "Not measured (no model given, or no item with a target): " + ", ".join(not_measured)]
    if report["failed"]:
        lines += ["", "## Failed items", "", "| utt | stage | reason |", "|---|---|---|"]
        lines += [f"| {f['utt']} | {f['stage']} | {str(f['reason']).replace('|', '/')} |" for f in report["failed"]]
    return "\n".join(lines) + "\n"


def compare_table(a: dict, b: dict) -> str:
    """Markdown: the two reports' headline figures side by side, with B - A."""
    if a["lang"] != b["lang"] or a["meta"] != b["meta"]:
        raise ValueError(
            f"the two evaluations used different test sets ({a['meta']} [{a['lang']}] vs "
            f"{b['meta']} [{b['lang']}]); they cannot be compared"
        )
    lines = [f"A = {a['ckpt']}", f"B = {b['ckpt']}", "", "| metric | A | B | B - A |", "|---|---|---|---|"]
    for (label, va, digits, na), (_, vb, _, nb) in zip(metric_rows(a), metric_rows(b)):
        delta = None if va is None or vb is None else vb - va
        counts = f" (n = {na} / {nb})" if na is not None else ""
        lines.append(f"| {label}{counts} | {_fmt(va, digits)} | {_fmt(vb, digits)} | {_fmt(delta, digits)} |")
    per = {r["utt"]: r for r in a["items"]}
    both = [
        (per[r["utt"]]["error_rate"], r["error_rate"])
        for r in b["items"]
        if r["utt"] in per and r["error_rate"] is not None and per[r["utt"]]["error_rate"] is not None
    ]
    if both:
        better = sum(eb < ea for ea, eb in both)
        worse = sum(eb > ea for ea, eb in both)
        lines += [
            "",
            f"per-item error rate, B vs A: {better} better, {worse} worse, {len(both) - better - worse} equal",
        ]
    return "\n".join(lines) + "\n"


def load_report(path: str | Path) -> dict | None:
    p = Path(path) / "eval.json"
    return json.loads(p.read_text()) if p.is_file() else None
