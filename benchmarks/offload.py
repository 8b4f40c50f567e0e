"""Activation memory and step time: plain vs ActivationOffload vs torch's save_on_cpu (and checkpoint).

A decoder-only transformer (pre-norm blocks, causal SDPA, GELU MLP) trained with AdamW under
bf16 autocast. For each variant it measures, over the same steps:

* peak device memory during forward + backward above the static memory (parameters and
  optimizer state; gradients are allocated during backward and are included, equally for all);
* the median wall time of a full training step (forward, backward, optimizer step).

Variants: ``plain``; ``checkpoint`` (``torch.utils.checkpoint`` per block, no offload: what the
recompute alone costs); ``offload`` (``ActivationOffload`` per block); ``offload_but_last``
(the last block not checkpointed: its activations die as soon as backward starts, so this
saves one recompute at the same peak); ``save_on_cpu`` (``torch.autograd.graph.save_on_cpu``
with pinned memory: every saved tensor goes to the host, nothing is recomputed).

Usage: ``python benchmarks/offload.py [--layers 8 --d-model 2048 --seq 2048 --batch 8]``.
Needs a CUDA GPU; on a machine without one it says so and exits 0. Runs in about a minute on
an H200 with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d, bias=False)
        self.fc2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.use_checkpoint = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            if self.use_checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))


def run_variant(name, model, opt, tokens, steps, warmup):
    from lightning_utils.offload import apply_activation_offload, remove_activation_offload

    model.use_checkpoint = name == "checkpoint"
    if name == "offload":
        apply_activation_offload(model, Block)
    elif name == "offload_but_last":
        last = f"blocks.{len(model.blocks) - 1}"
        apply_activation_offload(model, Block, exclude=[last])

    def step():
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if name == "save_on_cpu":
                with torch.autograd.graph.save_on_cpu(pin_memory=True):
                    logits = model(tokens[:, :-1])
            else:
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - static
        opt.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start, peak, loss.item()

    try:
        for _ in range(warmup):
            step()
        times, peaks, losses = [], [], []
        for _ in range(steps):
            t, p, loss = step()
            times.append(t)
            peaks.append(p)
            losses.append(loss)
    finally:
        remove_activation_offload(model)
        model.use_checkpoint = False
    return statistics.median(times), max(peaks), losses[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--variants", default="plain,checkpoint,offload,offload_but_last,save_on_cpu", help="comma-separated"
    )
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/offload.py needs a GPU (CUDA); none is available here, so nothing was measured.")
        return 0

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = LM(args.vocab, args.d_model, args.heads, args.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | {n_params / 1e6:.0f}M params, "
        f"{args.layers} layers, d={args.d_model}, batch {args.batch} x seq {args.seq}, bf16 autocast, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )

    results = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        t, peak, loss = run_variant(name, model, opt, tokens, args.steps, args.warmup)
        results[name] = (t, peak)
        print(f"{name:>17}: step {t * 1e3:8.1f} ms | peak memory above static {peak / 2**30:7.2f} GiB | loss {loss:.4f}")
        torch.cuda.empty_cache()

    if "plain" in results:
        t0, m0 = results["plain"]
        print("\nrelative to plain (memory lower by / step time overhead):")
        for name, (t, m) in results.items():
            if name != "plain":
                print(f"{name:>17}: memory -{(1 - m / m0) * 100:5.1f}% | time {(t / t0 - 1) * 100:+6.1f}%")
        if "offload" in results:
            t, m = results["offload"]
            mem_ok, time_ok = (1 - m / m0) >= 0.5, (t / t0 - 1) < 0.25
            print(
                f"\ngoal >= 50% lower activation memory: {'met' if mem_ok else 'NOT met'}; "
                f"goal < 25% step overhead: {'met' if time_ok else 'NOT met'}"
            )
    if "offload" in results and "save_on_cpu" in results:
        (t1, m1), (t2, m2) = results["offload"], results["save_on_cpu"]
        print(f"offload vs save_on_cpu: memory x{m1 / m2:.2f}, time x{t1 / t2:.2f}")
    if "offload" in results and "checkpoint" in results:
        (t1, m1), (t2, m2) = results["offload"], results["checkpoint"]
        print(f"offload vs torch.utils.checkpoint: memory x{m1 / m2:.2f}, time x{t1 / t2:.2f} (cost of the host copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
