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
The CUDA figures need a GPU (about a minute on an H200 with the defaults). Without one (or with
``--cpu``) it says so and measures CPU proxies instead, on a small model (``--cpu-layers``,
``--cpu-d-model``, ``--cpu-seq``, ``--cpu-batch``; about 20 s on 2 cores), then exits 0:

* **bytes held for backward**, device-independent: every tensor autograd saves during the forward
  is counted once per storage with ``torch.autograd.graph.saved_tensors_hooks`` (parameters
  excluded), split into what a CUDA run keeps on the GPU and what it moves to host memory
  (``ActivationOffload``: the wrapped blocks' inputs; ``save_on_cpu``: everything), plus what
  one block's forward saves (re-created, one block at a time, by a recompute in backward);
* **CPU step-time ratios** (forward + backward + AdamW step) against ``plain``. They show the
  recompute cost only; the host copies, their overlap with compute and the < 25 % goal are
  CUDA matters, so these are proxies, not the goal figures.
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
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return self.head(self.norm(x))


def run_variant(name, model, opt, tokens, steps, warmup):
    from lightning_utils.modules.offload import apply_activation_offload, remove_activation_offload

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


# ---------------------------------------------------------------------------------------------
# CPU proxies (no GPU needed)
class _SavedBytes:
    """saved_tensors_hooks counting each saved storage once, optionally around another hook pair."""

    def __init__(self, exclude: set[int], inner: torch.autograd.graph.saved_tensors_hooks | None = None):
        self.exclude = exclude
        self.inner = inner
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude:
            self.seen.setdefault(ptr, storage.nbytes())
        return self.inner.pack_hook(t) if self.inner is not None else t

    def unpack(self, packed):
        return self.inner.unpack_hook(packed) if self.inner is not None else packed

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    @property
    def forward_bytes(self) -> int:
        return sum(self.seen.values())


def _block_input_bytes(model: LM, run) -> int:
    """Bytes of the blocks' tensor inputs during one forward (what ActivationOffload moves to host)."""
    seen: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # so a freed input's address is not reused and deduplicated

    def pre_hook(module, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                alive.append(a)
                seen.setdefault(a.untyped_storage().data_ptr(), a.untyped_storage().nbytes())

    handles = [b.register_forward_pre_hook(pre_hook) for b in model.blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())


def cpu_proxies(args) -> None:
    from lightning_utils.modules.offload import apply_activation_offload, remove_activation_offload

    torch.set_num_threads(max(1, min(torch.get_num_threads(), args.cpu_threads)))
    torch.manual_seed(0)
    model = LM(args.vocab, args.cpu_d_model, args.cpu_heads, args.cpu_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab, (args.cpu_batch, args.cpu_seq + 1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    print(
        f"CPU proxies | torch {torch.__version__} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{args.cpu_layers} layers, d={args.cpu_d_model}, vocab {args.vocab}, batch {args.cpu_batch} x seq "
        f"{args.cpu_seq}, fp32, {torch.get_num_threads()} threads"
    )
    variants = ["plain", "checkpoint", "offload", "save_on_cpu"]

    def configure(name):
        remove_activation_offload(model)
        model.use_checkpoint = name == "checkpoint"
        if name == "offload":
            apply_activation_offload(model, Block)

    def loss_of():
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    # What one block's forward saves for backward in the plain model: what a recompute re-creates.
    inside = [False]
    block_counter = _SavedBytes(params)
    hooks = [b.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)) for b in model.blocks]
    hooks += [b.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False)) for b in model.blocks]
    outer_pack = block_counter.pack
    block_counter.pack = lambda t: outer_pack(t) if inside[0] else t  # type: ignore[method-assign]
    with block_counter.hooks():
        loss_of()
    for h in hooks:
        h.remove()
    per_block = block_counter.forward_bytes / max(1, args.cpu_layers)
    moved_by_offload = _block_input_bytes(model, lambda: model(tokens[:, :-1]))

    memory, grads = {}, {}
    for name in variants:
        configure(name)
        inner = torch.autograd.graph.save_on_cpu(pin_memory=False) if name == "save_on_cpu" else None
        counter = _SavedBytes(params, inner)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with counter.hooks():  # the forward only: what is held when backward starts
            loss = loss_of()
        loss.backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
        held = counter.forward_bytes
        host = {"offload": moved_by_offload, "save_on_cpu": held}.get(name, 0)
        memory[name] = (held, held - host, host)

    # Step times, the variants interleaved round by round (the box may be shared), each step
    # from the same weights.
    snapshot = [p.detach().clone() for p in model.parameters()]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.cpu_warmup + args.cpu_steps):
        for name in variants:
            configure(name)
            with torch.no_grad():
                for p, v in zip(model.parameters(), snapshot):
                    p.copy_(v)
            opt.state.clear()
            opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            if name == "save_on_cpu":
                with torch.autograd.graph.save_on_cpu(pin_memory=False):
                    loss = loss_of()
            else:
                loss = loss_of()
            loss.backward()
            opt.step()
            if round_ >= args.cpu_warmup:
                times[name].append(time.perf_counter() - start)
    configure("plain")
    median = {name: statistics.median(t) for name, t in times.items()}

    mib = 2**20
    print("\nbytes saved for backward by the forward (activations; parameters excluded), and where a")
    print("CUDA run would keep them (offload: the blocks' inputs go to host; save_on_cpu: everything):")
    print(f"{'variant':>12} | {'saved':>9} | {'on the GPU':>10} | {'in host RAM':>11}")
    for name in variants:
        held, dev, host = memory[name]
        print(f"{name:>12} | {held / mib:7.1f}Mi | {dev / mib:8.1f}Mi | {host / mib:9.1f}Mi")
    print(f"one block's forward saves {per_block / mib:.1f}Mi (re-created, one block at a time, by a recompute)")
    plain_dev = memory["plain"][1]
    print("\nactivation memory on the GPU relative to plain, proxy (held after forward + one block's")
    print("recompute for checkpoint/offload; save_on_cpu's reloads during backward not counted):")
    for name in variants[1:]:
        transient = per_block if name in ("checkpoint", "offload") else 0.0
        print(f"{name:>12}: -{(1 - (memory[name][1] + transient) / plain_dev) * 100:5.1f}%")
    print("\nCPU step time (median, forward + backward + AdamW) relative to plain. A CPU proxy for the")
    print("recompute cost only: no host copies happen on CPU; it is not the CUDA < 25% goal:")
    for name in variants:
        print(f"{name:>12}: {median[name] * 1e3:8.1f} ms  x{median[name] / median['plain']:.2f}")
    same = all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(grads["plain"], grads["offload"]))
    print(f"\ngradients of offload == plain (1e-6, same seed): {same}")


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
    parser.add_argument("--cpu", action="store_true", help="only the CPU proxies, even with a GPU")
    parser.add_argument("--cpu-layers", type=int, default=4)
    parser.add_argument("--cpu-d-model", type=int, default=256)
    parser.add_argument("--cpu-heads", type=int, default=4)
    parser.add_argument("--cpu-seq", type=int, default=256)
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--cpu-steps", type=int, default=5)
    parser.add_argument("--cpu-warmup", type=int, default=1)
    parser.add_argument("--cpu-threads", type=int, default=2)
    args = parser.parse_args(argv)

    if args.cpu or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            print(
                "The CUDA figures (peak GPU memory, step time with host copies; goals >= 50% lower "
                "activation memory, < 25% step overhead) need a GPU; none is available here.\n"
            )
        cpu_proxies(args)
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
        print(
            f"{name:>17}: step {t * 1e3:8.1f} ms | peak memory above static {peak / 2**30:7.2f} GiB | loss {loss:.4f}"
        )
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
        print(
            f"offload vs torch.utils.checkpoint: memory x{m1 / m2:.2f}, time x{t1 / t2:.2f} (cost of the host copies)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
