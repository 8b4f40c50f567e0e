"""Benchmark: APOLLO / APOLLO-Mini vs torch AdamW (and the upstream apollo-torch package).

Measures, in one run, on this machine's CPU:

1. optimizer state bytes and ``step()`` time on large square matrices (default 2 x 4096x4096);
2. the same on a small transformer LM (default ~3.7M parameters: d_model 256, 4 layers,
   vocab 1024), APOLLO on the block matrices, AdamW on embeddings, head, norms and biases;
3. held-out loss after N training steps on synthetic codec-token data (a sparse bigram chain),
   best of a small lr grid for each optimizer;
4. ``--sections fsdp2`` (not in the default run): the optimizers on a ~50M-parameter transformer
   sharded with FSDP2 (``fully_shard`` per block, then the root) over 2 gloo ranks on CPU:
   wall time of ``step()`` (slowest rank, collectives included), per-rank optimizer state on the
   projected matrices, and the bytes each optimizer's collectives send per step, recorded by
   wrapping ``torch.distributed``'s collectives during ``step()``, against the bytes of the
   gradient reduce-scatter (computed from the gradient sizes and also recorded in backward).

Goals (issue 4): Mini state < 5% of AdamW on projected matrices; step time <= 1.3x
``torch.optim.AdamW(foreach=True)``; <= 1.0x the upstream package; loss within 5% of AdamW.

The upstream comparison is optional and **never** a dependency of lightning-utils (its code is
CC BY-NC 4.0). To include it, install it into the benchmark environment yourself:

    .venv/bin/pip install apollo-torch      # pulls transformers and bitsandbytes

then run the benchmark; without it the upstream columns are skipped with a message.

Usage (about 3 minutes on a 2-core CPU with the defaults; ``--quick`` takes well under one):

    .venv/bin/python benchmarks/optim.py
    .venv/bin/python benchmarks/optim.py --quick
    .venv/bin/python benchmarks/optim.py --matrix-size 2048 --matrices 1 --loss-steps 0
    .venv/bin/python benchmarks/optim.py --sections fsdp2             # about 3 minutes

Timings are CPU time with one intra-op thread by default (``--threads``), interleaving the
optimizers over several rounds and reporting the median, because the machine may be shared;
ratios are always taken within one run. Each APOLLO row is followed by the time of its
projection matmuls alone (``r*m*n`` multiply-adds per matrix, vs AdamW's ``O(m*n)`` elementwise
work): on a CPU that matmul by itself can exceed 1.3x AdamW's whole step (2 x 4096^2 at rank 256),
so it is printed as the floor. ``--matmul-precision medium`` runs with torch's global
``torch.set_float32_matmul_precision("medium")`` (bfloat16-based float32 matmuls where the CPU
has them); the header prints the resulting matmul error so the trade is visible.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_utils.optim import Apollo, ApolloMini, WarmupLR, apollo_param_groups

try:  # optional, benchmark only; see the module docstring
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from apollo_torch import APOLLOAdamW  # type: ignore[import-not-found]
except Exception as error:
    APOLLOAdamW = None
    UPSTREAM_MISSING = f"{type(error).__name__}: {error}"
else:
    UPSTREAM_MISSING = ""

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


# --- models and data --------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class BigramCodecData:
    """Codec-like token streams from a fixed sparse bigram chain (4 likely successors per token)."""

    def __init__(self, vocab: int, seq_len: int, batch_size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab, (vocab, 4), generator=gen)
        self.vocab, self.seq_len, self.batch_size = vocab, seq_len, batch_size

    def batch(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10_000 + index)
        tokens = torch.empty(self.batch_size, self.seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (self.batch_size,), generator=gen)
        choice = torch.randint(0, 4, (self.batch_size, self.seq_len), generator=gen)
        for t in range(self.seq_len):
            tokens[:, t + 1] = self.successors[tokens[:, t], choice[:, t]]
        return tokens


def lm_loss(model: TinyLM, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def lm_groups(model: TinyLM) -> list[dict]:
    # APOLLO on the attention and MLP matrices; AdamW on embeddings, head, norms and biases.
    return apollo_param_groups(model, include=["blocks.*"], exclude=["*.bias", "*norm*"])


# --- optimizers -------------------------------------------------------------------------------


def upstream_groups(groups: list[dict], **options) -> list[dict]:
    """The upstream package marks low-rank groups by their keys; AdamW groups carry none."""
    out = []
    for group in groups:
        params = {"params": group["params"]}
        if group.get("rank", None) != 0:
            params.update(options)
        out.append(params)
    return out


def optimizers(rank: int, gap: int, lr: float | None = None) -> dict[str, OptimizerFactory]:
    def kw(default: float) -> dict:
        return {"lr": lr if lr is not None else default}

    table: dict[str, OptimizerFactory] = {
        "AdamW(foreach)": lambda g: torch.optim.AdamW([{"params": x["params"]} for x in g], foreach=True, **kw(1e-3)),
        f"Apollo(r={rank})": lambda g: Apollo(g, rank=rank, update_proj_gap=gap, **kw(1e-3)),
        "ApolloMini": lambda g: ApolloMini(g, update_proj_gap=gap, **kw(1e-3)),
    }
    if APOLLOAdamW is not None:
        table[f"upstream Apollo(r={rank})"] = lambda g: APOLLOAdamW(
            upstream_groups(
                g, rank=rank, proj="random", scale_type="channel", scale=1, update_proj_gap=gap, proj_type="std"
            ),
            **kw(1e-3),
        )
        table["upstream Mini"] = lambda g: APOLLOAdamW(
            upstream_groups(
                g, rank=1, proj="random", scale_type="tensor", scale=128, update_proj_gap=gap, proj_type="std"
            ),
            **kw(1e-3),
        )
    return table


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> int:
    keep = None if params is None else {id(p) for p in params}
    total = 0
    for param, state in optimizer.state.items():
        if keep is not None and id(param) not in keep:
            continue
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix") and torch.is_tensor(getattr(value, "ortho_matrix", None)):
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()  # upstream projector
    return total


def cache_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Our cached random projections (not state; rebuilt from seeds after a load)."""
    cache = getattr(optimizer, "_projections", {})
    return sum(m.numel() * m.element_size() for _, m in cache.values())


def time_steps(built: dict[str, torch.optim.Optimizer], steps: int, rounds: int) -> dict[str, float]:
    """Median CPU seconds per ``step()``, optimizers interleaved round by round.

    CPU time of this process (not wall time): with one intra-op thread it is insensitive to
    other load on a shared machine.
    """
    samples: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, optimizer in built.items():
            start = time.process_time()
            for _ in range(steps):
                optimizer.step()
            samples[name].append((time.process_time() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def matmul_floor(
    optimizer: torch.optim.Optimizer, projected: list[torch.Tensor], steps: int, rounds: int
) -> float | None:
    """Median CPU seconds of the projection matmuls alone (``G @ P.T`` or ``P.T @ G`` with the
    optimizer's cached matrices): the part of an APOLLO step no implementation can avoid."""
    cache = getattr(optimizer, "_projections", None)
    if not cache:
        return None
    pairs = []
    for p in projected:
        if p not in cache:
            continue
        grad = p.grad.reshape(p.shape[0], -1)
        matrix = cache[p][1]
        right = matrix.shape[1] == grad.shape[1] and grad.shape[0] >= grad.shape[1]  # P is (r, n): G @ P.T
        pairs.append((grad, matrix, right))

    def run() -> None:
        for grad, matrix, right in pairs:
            torch.mm(grad, matrix.t()) if right else torch.mm(matrix.t(), grad)

    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(steps):
            run()
        samples.append((time.process_time() - start) / steps)
    return statistics.median(samples)


def report(
    title: str,
    built: dict[str, torch.optim.Optimizer],
    times: dict[str, float],
    projected: list[torch.Tensor],
    args: argparse.Namespace,
) -> None:
    base_name = "AdamW(foreach)"
    base_state = state_bytes(built[base_name], projected)
    base_time = times[base_name]
    print(f"\n## {title}")
    print(
        f"{'optimizer':<26}{'state MiB (all)':>16}{'on projected':>14}{'vs AdamW':>10}"
        f"{'proj cache MiB':>16}{'step ms':>10}{'vs AdamW':>10}"
    )
    for name, optimizer in built.items():
        projected_bytes = state_bytes(optimizer, projected)
        print(
            f"{name:<26}{state_bytes(optimizer) / 2**20:>16.2f}{projected_bytes / 2**20:>14.2f}"
            f"{projected_bytes / base_state:>9.1%} {cache_bytes(optimizer) / 2**20:>15.2f}"
            f"{times[name] * 1e3:>10.1f}{times[name] / base_time:>9.2f}x"
        )
    for name in ("Apollo(r=", "ApolloMini"):
        mine = next((n for n in times if n.startswith(name)), None)
        floor = matmul_floor(built[mine], projected, args.time_steps, args.rounds) if mine else None
        if floor is not None:
            print(
                f"{mine}: projection matmul alone {floor * 1e3:.1f} ms = {floor / base_time:.2f}x AdamW "
                f"(the floor for any implementation); everything else {(times[mine] - floor) * 1e3:.1f} ms "
                f"= {(times[mine] - floor) / base_time:.2f}x AdamW"
            )
    for ours, theirs in (("Apollo(r=", "upstream Apollo(r="), ("ApolloMini", "upstream Mini")):
        mine = next((n for n in times if n.startswith(ours)), None)
        other = next((n for n in times if n.startswith(theirs)), None)
        if mine and other:
            print(f"{mine} vs {other}: {times[mine] / times[other]:.2f}x step time")
    if APOLLOAdamW is None:
        print(f"(upstream apollo-torch not installed, columns skipped: {UPSTREAM_MISSING})")


# --- sections ---------------------------------------------------------------------------------


def bench_matrices(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    size = args.matrix_size
    params = [nn.Parameter(torch.randn(size, size, generator=gen)) for _ in range(args.matrices)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    built = {name: make([{"params": params}]) for name, make in optimizers(args.rank, args.gap).items()}
    for optimizer in built.values():
        optimizer.step()  # allocate state and draw the projections (refresh cost not timed)
    times = time_steps(built, args.time_steps, args.rounds)
    title = f"{args.matrices} x {size}x{size} matrices (fp32, update_proj_gap={args.gap})"
    report(title, built, times, params, args)


def bench_lm_step(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.d_model, args.layers, args.heads, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    data = BigramCodecData(args.vocab, args.seq_len, args.batch_size)
    lm_loss(model, data.batch(0)).backward()
    groups = lm_groups(model)
    projected = groups[0]["params"]
    rank = min(args.rank, args.d_model // 4)
    built = {name: make([dict(g) for g in groups]) for name, make in optimizers(rank, args.gap).items()}
    for optimizer in built.values():
        optimizer.step()
    times = time_steps(built, args.time_steps, args.rounds)
    report(
        f"transformer LM step ({n_params / 1e6:.2f}M params, d_model {args.d_model}, {args.layers} layers, "
        f"vocab {args.vocab}; {sum(p.numel() for p in projected) / 1e6:.2f}M on APOLLO)",
        built,
        times,
        projected,
        args,
    )


def bench_loss(args: argparse.Namespace) -> None:
    d_model, layers = args.loss_d_model, args.loss_layers
    data = BigramCodecData(args.loss_vocab, args.loss_seq_len, args.batch_size)
    held_out = [data.batch(1_000_000 + i) for i in range(4)]
    floor = math.log(4)
    rank = max(1, d_model // 4)
    grid = {
        "AdamW(foreach)": [float(x) for x in args.adamw_lrs.split(",")],
        f"Apollo(r={rank})": [float(x) for x in args.apollo_lrs.split(",")],
        "ApolloMini": [float(x) for x in args.mini_lrs.split(",")],
    }
    print(
        f"\n## loss after {args.loss_steps} steps (d_model {d_model}, {layers} layers, vocab {args.loss_vocab}, "
        f"seq {args.loss_seq_len}, batch {args.batch_size}; WarmupLR {args.loss_steps // 10}; "
        f"entropy floor {floor:.3f})"
    )
    best: dict[str, tuple[float, float]] = {}
    for name, lrs in grid.items():
        for lr in lrs:
            torch.manual_seed(0)
            model = TinyLM(args.loss_vocab, d_model, layers, max(1, d_model // 64), args.loss_seq_len)
            optimizer = optimizers(rank, args.gap, lr=lr)[name](lm_groups(model))
            scheduler = WarmupLR(optimizer, warmup_steps=max(1, args.loss_steps // 10))
            start = time.perf_counter()
            for step in range(args.loss_steps):
                optimizer.zero_grad(set_to_none=True)
                lm_loss(model, data.batch(step)).backward()
                optimizer.step()
                scheduler.step()
            with torch.no_grad():
                loss = statistics.fmean(lm_loss(model, b).item() for b in held_out)
            print(f"  {name:<18} lr {lr:<8g} held-out loss {loss:.4f}   ({time.perf_counter() - start:.1f}s)")
            if name not in best or loss < best[name][0]:
                best[name] = (loss, lr)
    base = best["AdamW(foreach)"][0]
    print(f"{'optimizer':<20}{'best lr':>10}{'loss':>10}{'vs AdamW':>10}")
    for name, (loss, lr) in best.items():
        print(f"{name:<20}{lr:>10g}{loss:>10.4f}{loss / base - 1:>+9.1%}")


# --- FSDP2: 2 gloo ranks on CPU ------------------------------------------------------------------

# Per-rank bytes sent by ring algorithms, as a multiple of the payload, for world size W:
# all-reduce 2(W-1)/W, reduce-scatter (W-1)/W of its input, all-gather (W-1)/W of its output.
_COLLECTIVES = {
    "all_reduce": (0, 2.0),
    "reduce_scatter_single": (1, 1.0),
    "reduce_scatter_tensor": (1, 1.0),
    "all_gather_single": (0, 1.0),
    "all_gather_into_tensor": (0, 1.0),
    "broadcast": (0, 1.0),
}


class CollectiveBytes:
    """Counts the bytes this rank sends in ``torch.distributed`` collectives while recording.

    Wraps the module's functions, so every caller that looks them up at call time (the
    optimizer, FSDP2's reduce-scatter) is counted; ``all_gather`` and ``reduce_scatter`` with
    lists are wrapped too, so that nothing goes uncounted.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.sent, self.calls, self._on = dist, 0.0, 0, False
        self.by_name: dict[str, float] = {}
        world = dist.get_world_size()
        self._originals: dict[str, Callable[..., Any]] = {}
        for name, (arg, factor) in _COLLECTIVES.items():
            if hasattr(dist, name):
                self._wrap(name, arg, factor * (world - 1) / world)
        for name in ("all_gather", "reduce_scatter", "all_to_all", "all_to_all_single", "all_reduce_coalesced"):
            if hasattr(dist, name):
                self._wrap(name, None, 1.0)

    def _wrap(self, name: str, arg: int | None, factor: float) -> None:
        original = getattr(self.dist, name)
        self._originals[name] = original
        signature = inspect.signature(original)
        payload = None if arg is None else list(signature.parameters)[arg]

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._on:
                self.calls += 1
                bound = signature.bind(*args, **kwargs).arguments
                if payload is None:  # list forms: count every tensor argument once
                    tensors = [t for a in bound.values() for t in (a if isinstance(a, list) else [a])]
                    sent = float(sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)))
                else:
                    tensor = bound[payload]
                    sent = factor * tensor.numel() * tensor.element_size()
                self.sent += sent
                self.by_name[name] = self.by_name.get(name, 0.0) + sent
            return original(*args, **kwargs)

        setattr(self.dist, name, counted)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.sent, self.calls, self._on, self.by_name = 0.0, 0, True, {}
        try:
            yield
        finally:
            self._on = False

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(self.dist, name, original)


def _local_bytes(value: Any) -> int:
    if hasattr(value, "to_local"):
        value = value.to_local()
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


def _fsdp2_worker(rank: int, args: argparse.Namespace, store: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    torch.set_num_threads(args.threads)
    world = args.fsdp_world
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        d, layers, vocab, seq = args.fsdp_d_model, args.fsdp_layers, args.fsdp_vocab, args.seq_len
        model = TinyLM(vocab, d, layers, args.fsdp_heads, seq)
        n_params = sum(p.numel() for p in model.parameters())
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        counter = CollectiveBytes()
        data = BigramCodecData(vocab, seq, batch_size=1, seed=rank)
        with counter.recording():
            lm_loss(model, data.batch(0)).backward()
        backward_rs = sum(sent for name, sent in counter.by_name.items() if name.startswith("reduce_scatter"))
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # global sizes
        computed_rs = grad_bytes * (world - 1) / world
        groups = lm_groups(model)  # apollo_param_groups on the sharded module
        projected = groups[0]["params"]
        rank_r = args.fsdp_rank
        gap = args.gap
        factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
            "AdamW(foreach)": lambda: torch.optim.AdamW([p for g in groups for p in g["params"]], foreach=True),
            # our AdamW path (rank=0) on the local shards: the same math without DTensor dispatch
            "Apollo(rank=0)": lambda: Apollo([{**g, "rank": 0} for g in groups]),
            f"Apollo(r={rank_r})": lambda: Apollo([dict(g) for g in groups], rank=rank_r, update_proj_gap=gap),
            f"Apollo(r={rank_r}, right)": lambda: Apollo(
                [dict(g) for g in groups], rank=rank_r, update_proj_gap=gap, proj_type="right"
            ),
            "ApolloMini": lambda: ApolloMini([dict(g) for g in groups], update_proj_gap=gap),
        }
        built = {name: make() for name, make in factories.items()}
        sent: dict[str, float] = {}
        calls: dict[str, int] = {}
        for name, optimizer in built.items():
            optimizer.step()  # allocate state and draw the projections (refresh cost not timed)
            with counter.recording():
                optimizer.step()
            sent[name], calls[name] = counter.sent, counter.calls
        counter.restore()
        samples: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(args.rounds):
            for name, optimizer in built.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.time_steps):
                    optimizer.step()
                elapsed = torch.tensor([(time.perf_counter() - start) / args.time_steps], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's step
                samples[name].append(elapsed.item())
        times = {name: statistics.median(values) for name, values in samples.items()}
        keep = {id(p) for p in projected}
        state = {
            name: sum(_local_bytes(v) for p, s in optimizer.state.items() if id(p) in keep for v in s.values())
            for name, optimizer in built.items()
        }
        if rank != 0:
            return
        base = "AdamW(foreach)"
        projected_numel = sum(p.numel() for p in projected)
        print(
            f"\n## FSDP2, {world} gloo ranks on CPU ({args.threads} thread(s) each): transformer LM "
            f"{n_params / 1e6:.1f}M params (d_model {d}, {layers} layers, vocab {vocab}; "
            f"{projected_numel / 1e6:.1f}M on APOLLO), fully_shard per block then the root; "
            f"update_proj_gap={gap}"
        )
        print(
            f"gradient reduce-scatter per step and rank: {computed_rs / 2**20:.1f} MiB computed from the "
            f"gradient sizes ((W-1)/W x {grad_bytes / 2**20:.1f} MiB), {backward_rs / 2**20:.1f} MiB "
            "recorded in backward"
        )
        print(
            f"{'optimizer':<24}{'step ms':>9}{'vs AdamW':>10}{'state/rank MiB':>16}{'vs AdamW':>10}"
            f"{'sent/step KiB':>15}{'calls':>7}{'vs grad RS':>12}"
        )
        for name in built:
            print(
                f"{name:<24}{times[name] * 1e3:>9.1f}{times[name] / times[base]:>9.2f}x"
                f"{state[name] / 2**20:>16.2f}{state[name] / state[base]:>9.2%} "
                f"{sent[name] / 2**10:>14.2f}{calls[name]:>7}{sent[name] / computed_rs:>11.3%}"
            )
        print(
            "step ms: wall time of optimizer.step() on the slowest rank, collectives included (median of "
            f"{args.rounds} interleaved rounds of {args.time_steps}); state on the projected matrices; sent: "
            "bytes this rank's collectives send in one step (ring algorithms); Apollo(rank=0) is AdamW "
            "computed by Apollo's foreach path on the local shards"
        )
    finally:
        dist.destroy_process_group()


def bench_fsdp2(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # fork: the ranks inherit this interpreter's imports; nothing has touched threads yet
        mp.start_processes(
            _fsdp2_worker,
            args=(args, str(Path(tmp) / "store")),
            nprocs=args.fsdp_world,
            join=True,
            start_method="fork",
        )


def matmul_error() -> float:
    """Relative error of a float32 ``G @ P.T`` under the current matmul precision (vs float64)."""
    gen = torch.Generator().manual_seed(0)
    grad, matrix = torch.randn(512, 512, generator=gen), torch.randn(64, 512, generator=gen) / 8
    exact = grad.double() @ matrix.double().t()
    return ((grad @ matrix.t()).double() - exact).norm().item() / exact.norm().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix-size", type=int, default=4096)
    parser.add_argument("--matrices", type=int, default=2)
    parser.add_argument("--rank", type=int, default=256, help="APOLLO rank (clamped to d_model/4 for the LM)")
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--time-steps", type=int, default=5, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    parser.add_argument("--loss-steps", type=int, default=None, help="default 150 (40 with --quick); 0 skips")
    parser.add_argument("--loss-d-model", type=int, default=128)
    parser.add_argument("--loss-layers", type=int, default=2)
    parser.add_argument("--loss-vocab", type=int, default=256)
    parser.add_argument("--loss-seq-len", type=int, default=64)
    parser.add_argument("--adamw-lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--apollo-lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--mini-lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument(
        "--sections", default="matrices,lm,loss", help="comma list of matrices,lm,loss,fsdp2 (fsdp2: not by default)"
    )
    parser.add_argument("--fsdp-d-model", type=int, default=1408)
    parser.add_argument("--fsdp-layers", type=int, default=2)
    parser.add_argument("--fsdp-heads", type=int, default=11)
    parser.add_argument("--fsdp-vocab", type=int, default=1024)
    parser.add_argument("--fsdp-rank", type=int, default=128, help="Apollo rank in the fsdp2 section")
    parser.add_argument("--fsdp-world", type=int, default=2, help="gloo ranks in the fsdp2 section")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable CPU times)")
    parser.add_argument(
        "--matmul-precision",
        choices=["highest", "high", "medium"],
        default="highest",
        help="torch.set_float32_matmul_precision for the run (a global torch setting; default torch's own)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.matrix_size, args.matrices, args.d_model, args.layers = 1024, 1, 128, 2
        args.rounds, args.time_steps = 3, 3
        args.fsdp_d_model, args.fsdp_heads, args.fsdp_rank = 256, 4, 32
    if args.loss_steps is None:
        args.loss_steps = 40 if args.quick else 150
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); step times are CPU ms (median); "
        f"float32 matmul precision {args.matmul_precision!r} ({matmul_error():.1e} relative error of a "
        "projection matmul vs float64)"
    )
    sections = set(args.sections.split(","))
    if "matrices" in sections:
        bench_matrices(args)
    if "lm" in sections:
        bench_lm_step(args)
    if "loss" in sections and args.loss_steps > 0:
        bench_loss(args)
    if "fsdp2" in sections:
        bench_fsdp2(args)


if __name__ == "__main__":
    main()
