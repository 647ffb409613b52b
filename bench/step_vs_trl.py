"""A whole GRPO step: our trainer (rl/trainer.py) vs TRL's GRPOTrainer on the same work, as samples per second.

    python bench/step_vs_trl.py                 # the tiny speech LM
    python bench/step_vs_trl.py --size mid      # a ~110 M-parameter random Llama (768 x 12), shorter rollouts

Needs `pip install trl` (measured with trl 1.16.0); no vLLM, no vocoder, no audio scorers.

The same random GLM-TTS speech LM (policies/tiny.py layout, written to a temporary directory), the same shipped
prompts (text + voice-prompt codes, identical token ids), `--prompts` prompts x `--group` samples per step,
temperature 1, top-k 25, top-p 0.8, no RAS, and a token-level reward: the fraction of generated speech codes
below 16384. One optimizer step per rollout batch (one epoch, one minibatch), AdamW (betas 0.9/0.95, lr 1e-6),
grad-norm clip 1, clip range 0.2/0.2, no KL and no reference model, token-mean loss (TRL's "dapo"), no dynamic
resampling.

Equal work: every row generates exactly `--new-tokens` tokens. Ours: min = max length (stop masked); TRL:
generation_kwargs min_new_tokens = max_completion_length (its EOS, set to the stop token, masked), and the
model's `generate` is given a LogitsProcessor that sets every id that is neither a speech token nor stop to -inf
(bench/rollout.py's SpeechOnly; TRL has no option for a logits processor, so the model instance's `generate` is
wrapped), so both sample from the same restricted vocabulary. (`generation_kwargs={"suppress_tokens": [...]}`
would do the same, but transformers rebuilds that mask with torch.isin on every step, which would make TRL look
several times slower than it need be.) TRL gets the prompts as text through a word-level PreTrainedTokenizerFast
whose words are the LM ids, so it sees exactly our prompt ids. Both use fused AdamW (TRL's default optimizer).

Differences that remain (each side does what it does in real use): our behaviour log-probs are those of the
truncated (top-k/top-p) distribution actually sampled from, and the teacher-forced pass recomputes that same
distribution (the ratio is exactly 1 before the update); TRL's training log-probs are of the temperature-scaled
full softmax. Our trainer also computes the loss metrics and entropy estimate it logs; TRL logs its own.

Timing: the wall time between consecutive steps' ends (ours: metrics rows; TRL: on_step_end), i.e. the whole
step: sampling, scoring, advantages, forward + backward + optimizer step and bookkeeping. Step 1 is warm-up and
not counted; each run's figure is the median of its `--steps` measured steps. Runs of ours and TRL alternate
`--rounds` times, each in a fresh process (so that neither inherits the other's heap); the ratio is the median
over rounds of (our samples/s) / (TRL samples/s).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rollout import SpeechOnly  # noqa: E402
from rewards.base import ScoreResult  # noqa: E402
from rollouts.manifest import read_manifest  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny" / "manifest.jsonl"
NUM_CODES = 32768
LOW_CODES = NUM_CODES // 2  # the reward: fraction of generated codes below this
SIZES = {
    "tiny": {},
    "mid": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4},
}


class LowCodeFraction:
    """Token-level reward for our trainer (rewards.<name>.scorer: bench.step_vs_trl:LowCodeFraction)."""

    def __call__(self, samples):
        return ScoreResult.build(
            [float(np.mean(s.codes < LOW_CODES)) if len(s.codes) else 0.0 for s in samples], [None] * len(samples)
        )


def write_checkpoint(directory: Path, size: str) -> Path:
    from policies.tiny import write_tiny_checkpoint

    texts = [t for r in read_manifest(MANIFEST) for t in (r.prompt_text, r.target_text)]
    return write_tiny_checkpoint(directory, texts, seed=0, **SIZES[size])


# --- ours ------------------------------------------------------------------------------------------------------


def run_ours(ckpt: Path, out: Path, args) -> list[float]:
    """Step wall times of our trainer (steps 2..); every step logs one metrics row, timed as it is written."""
    import rl.trainer as trainer
    from rl.config import config_from_data

    data = {
        "policy": {"ckpt_dir": str(ckpt)},
        "data": {"manifest": str(MANIFEST), "prompts_per_step": args.prompts},
        "sampling": {
            "group_size": args.group,
            "temperature": 1.0,
            "top_k": 25,
            "top_p": 0.8,
            "ras": False,
            "min_token_text_ratio": 1e9,
            "max_token_text_ratio": 1e9,
            "max_new_tokens": args.new_tokens,
        },
        "vocoder": {"enabled": False},
        "rewards": {"low": {"scorer": "bench.step_vs_trl:LowCodeFraction"}},
        "dynamic_sampling": {"mode": "off"},
        "loss": {"eps_low": 0.2, "eps_high": 0.2, "agg": "token_mean"},
        "optim": {"lr": 1e-6, "betas": [0.9, 0.95], "grad_clip": 1.0},
        "train": {"steps": 1 + args.steps, "save_every": 0, "samples_every": 0, "output_dir": str(out), "seed": 0},
        "wandb": {"enabled": False},
    }
    cfg, derived = config_from_data(data, "bench/step_vs_trl.py")
    stamps: list[float] = []

    class TimedLogger(trainer.MetricsLogger):
        def log(self, step, metrics):
            stamps.append(time.perf_counter())
            super().log(step, metrics)

    original = trainer.MetricsLogger
    trainer.MetricsLogger = TimedLogger
    try:
        trainer.train(cfg, derived, progress=False)
    finally:
        trainer.MetricsLogger = original
    return list(np.diff(stamps))


# --- TRL -------------------------------------------------------------------------------------------------------


def id_tokenizer(vocab_size: int, pad: int, eos: int):
    """A word-level fast tokenizer whose word `t<i>` is LM id i: TRL's text prompts carry our exact ids."""
    from tokenizers import Tokenizer
    from tokenizers.decoders import WordPiece
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token=f"t{pad}"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.decoder = WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=f"t{pad}", eos_token=f"t{eos}", unk_token=f"t{pad}", padding_side="left"
    )


def run_trl(ckpt: Path, out: Path, args) -> list[float]:
    from datasets import Dataset
    from transformers import LlamaForCausalLM, LogitsProcessorList, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from policies.glmtts import GLMTTSPolicy

    policy = GLMTTSPolicy.from_pretrained(ckpt)  # only for the prompt layout and the special ids
    s = policy.special
    vocab = policy.model.config.vocab_size
    records = read_manifest(MANIFEST)
    prompts = [" ".join(f"t{i}" for i in policy.prompt_input(r).ids) for r in records]
    tokenizer = id_tokenizer(vocab, s.pad, s.eoa)
    assert tokenizer(prompts[0])["input_ids"] == policy.prompt_input(records[0]).ids
    del policy

    def low_code_fraction(completions, completion_ids, **kwargs):
        return [float(np.mean(np.asarray(c) - s.ats < LOW_CODES)) if len(c) else 0.0 for c in completion_ids]

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    cfg = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        gradient_accumulation_steps=1,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_k=25,
        top_p=0.8,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        learning_rate=1e-6,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        epsilon=0.2,
        beta=0.0,
        loss_type="dapo",
        num_iterations=1,
        mask_truncated_completions=False,
        max_steps=1 + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        bf16=False,
        dataloader_num_workers=0,
    )
    model = LlamaForCausalLM.from_pretrained(str(ckpt / "llm"), dtype=torch.float32)
    speech_only = LogitsProcessorList([SpeechOnly(vocab, s.ats, s.ate, s.eoa, "cpu")])
    model.generate = functools.partial(model.generate, logits_processor=speech_only)  # TRL calls model.generate
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=low_code_fraction,
        args=cfg,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)  # its per-step dicts on stdout; the metrics are computed all the same
    trainer.train()
    return list(np.diff(stamps))


# --- both ------------------------------------------------------------------------------------------------------


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def _in_child(fn, *args):
    _quiet()
    return fn(*args)


def isolated(fn, *args, fresh_process: bool = True):
    """fn(*args), in a fresh (spawned) Python process unless fresh_process is False."""
    if not fresh_process:
        return fn(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_in_child, fn, *args).result()


def run(args) -> dict:
    _quiet()
    rows = args.prompts * args.group
    ours_t, trl_t, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", args.size)
        for k in range(args.rounds):
            fresh = not args.in_process
            a = statistics.median(isolated(run_ours, ckpt, Path(tmp) / f"ours{k}", args, fresh_process=fresh))
            b = statistics.median(isolated(run_trl, ckpt, Path(tmp) / f"trl{k}", args, fresh_process=fresh))
            ours_t.append(a)
            trl_t.append(b)
            ratios.append(b / a)
            print(f"  round {k + 1}: ours {a:.3f} s/step, TRL {b:.3f} s/step, ratio {b / a:.2f}x", flush=True)
    a, b, r = statistics.median(ours_t), statistics.median(trl_t), statistics.median(ratios)
    print(
        f"GRPO step, {args.size} speech LM, {torch.get_num_threads()} threads: {args.prompts} prompts x "
        f"{args.group} = {rows} samples/step, exactly {args.new_tokens} tokens each (stop masked both sides)"
    )
    print(f"  ours (rl/trainer.py)   {a:8.3f} s/step  {rows / a:7.2f} samples/s")
    print(f"  TRL GRPOTrainer        {b:8.3f} s/step  {rows / b:7.2f} samples/s")
    print(
        f"  ours / TRL samples/s: {r:.2f}x (median of {args.rounds} alternating rounds; each run: median of "
        f"{args.steps} steps after 1 warm-up step)"
    )
    return {"ours_s": a, "trl_s": b, "ratio": r}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--prompts", type=int, default=4, help="B: prompts per step")
    ap.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per sample (default: tiny 100, mid 50)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per run (default: tiny 5, mid 3)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (ours, TRL) runs")
    ap.add_argument("--in-process", action="store_true", help="run both in this process (no fresh process per run)")
    args = ap.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 100 if args.size == "tiny" else 50
    if args.steps is None:
        args.steps = 5 if args.size == "tiny" else 3
    return run(args)


if __name__ == "__main__":
    main()
