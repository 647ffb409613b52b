"""Gradient synchronisation per optimizer step on 2 processes: the engines of rl/engine.py vs a per-parameter
all-reduce after the backward passes (what ttsrl's data parallelism did before it used DDP / FSDP2).

    python bench/grad_sync.py                      # CPU, gloo, 2 processes (spawned here)
    python bench/grad_sync.py --device cuda        # GPU, nccl

Model: a GLM-TTS-shaped Llama (random weights) trained as the trainer does: `--micro` micro-batches of `--rows`
rows x `--seq` tokens per optimizer step. Variants, interleaved round by round so that machine noise hits all alike:
  local     forward + backward, no communication (the compute every variant shares)
  per-param the same, then one all_reduce per parameter's gradient after the last backward
  per-param-zero2  the same, then each gradient reduced onto one owner rank, and after the (owners') AdamW step
            each parameter broadcast from its owner: the communication of a per-parameter ZeRO-2
  ddp       DistributedDataParallel: bucketed all-reduce overlapping the last backward (no_sync before it)
  fsdp2     fully_shard per decoder layer + root, reshard_after_forward=False (optim.zero_stage 2)
Printed: the median time per optimizer step of each, and its synchronisation overhead (time - local).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
    )
    return LlamaForCausalLM(cfg).to(device)


class Root(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits.float().logsumexp(-1).mean()


def sum_hook(state, bucket):
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def one_step(kind, module, batches, params):
    for j, ids in enumerate(batches):
        last = j == len(batches) - 1
        if kind == "ddp" and not last:
            with module.no_sync():
                module(ids).backward()
        else:
            module(ids).backward()
    if kind == "per-param":
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    if kind == "per-param-zero2":
        world = dist.get_world_size()
        for i, p in enumerate(params):
            dist.reduce(p.grad, dst=i % world, op=dist.ReduceOp.SUM)
        for i, p in enumerate(params):
            dist.broadcast(p.data, src=i % world)
    for p in params:
        p.grad = None


def worker(rank, world, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, args.vocab, (args.rows, args.seq), generator=g).to(device) for _ in range(args.micro)]
    plain = Root(build(args, device))
    ddp = DistributedDataParallel(
        Root(build(args, device)),
        device_ids=[rank] if cuda else None,
        forward_sync_buffers=False,
        gradient_as_bucket_view=True,
    )
    ddp.register_comm_hook(None, sum_hook)
    sharded = Root(build(args, device))
    for layer in sharded.model.model.layers:
        fully_shard(layer, reshard_after_forward=False)
    fully_shard(sharded, reshard_after_forward=False)
    units = [*sharded.model.model.layers, sharded]
    for u in units:
        u.set_gradient_divide_factor(1.0)
        u.set_force_sum_reduction_for_comms(True)
    variants = {
        "local": (plain, list(plain.parameters())),
        "per-param": (plain, list(plain.parameters())),
        "per-param-zero2": (plain, list(plain.parameters())),
        "ddp": (ddp, list(ddp.parameters())),
        "fsdp2": (sharded, list(sharded.parameters())),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        for kind, (module, params) in variants.items():
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            one_step(kind, module, batches, params)
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if r >= args.warmup:
                times[kind].append(time.perf_counter() - t)
    if rank == 0:
        n = sum(p.numel() for p in plain.parameters())
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"model {n / 1e6:.1f} M parameters ({n * 4 / 2**20:.0f} MiB of fp32 gradients), {world} processes "
            f"({args.device}), {args.micro} micro-batches of {args.rows}x{args.seq} tokens per optimizer step, "
            f"median of {args.rounds} rounds"
        )
        print("| variant | time per optimizer step | sync overhead (time - local) |")
        print("|---|---|---|")
        for k in variants:
            over = med[k] - med["local"]
            print(f"| {k} | {med[k] * 1e3:.0f} ms | {'' if k == 'local' else f'{over * 1e3:.0f} ms'} |")
        for old, new in (("per-param", "ddp"), ("per-param-zero2", "fsdp2")):
            a, b = med[old] - med["local"], med[new] - med["local"]
            print(f"{old} sync overhead / {new} sync overhead: {a / b:.2f}x" if b > 0 else f"{new}: no overhead")
            print(f"{old} step time / {new} step time: {med[old] / med[new]:.2f}x")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=29533)
    args = ap.parse_args()
    mp.spawn(worker, args=(2, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
