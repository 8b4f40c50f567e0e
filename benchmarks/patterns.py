"""Benchmark: lightning_utils.patterns against a straightforward per-step Python loop.

The loop baseline is what one writes first: walk the layout step by step and copy that
step's codes with one indexing op per step (build), or copy each step back onto the timeline
(revert). Ours is one cached index table and one gather per call. Both are checked to give
the same result before timing.

    python benchmarks/patterns.py                       # B=16, K=8, T=1500 (30 s at 50 Hz)
    python benchmarks/patterns.py --timesteps 500 --repeats 5 --device cuda

Prints the best time per call over --repeats runs (the least disturbed by other load) and
the speed ratio (loop / ours).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lightning_utils.patterns import DelayedPatternProvider, MusicLMPattern, UnrolledPatternProvider


# ----------------------------------------------------------------------------- loop baseline
def step_index(layout):
    """Per step: the (codebooks, timesteps) it holds, as index tensors (prepared once, not timed)."""
    return [
        (torch.tensor([c.q for c in coords], dtype=torch.long), torch.tensor([c.t for c in coords], dtype=torch.long))
        for coords in layout
    ]


def loop_build(steps, z, special):
    batch, n_q, timesteps = z.shape
    out = torch.full((batch, n_q, len(steps)), special, dtype=z.dtype, device=z.device)
    for s, (qs, ts) in enumerate(steps):
        keep = ts < timesteps
        if bool(keep.any()):
            out[:, qs[keep], s] = z[:, qs[keep], ts[keep]]
    return out


def loop_revert(steps, seq, special, timesteps):
    out = torch.full((*seq.shape[:-1], timesteps), special, dtype=seq.dtype, device=seq.device)
    for s, (qs, ts) in enumerate(steps):
        keep = ts < timesteps
        if bool(keep.any()):
            out[..., qs[keep], ts[keep]] = seq[..., qs[keep], s : s + 1].squeeze(-1)
    return out


def loop_revert_logits(steps, logits, special, timesteps):
    # output s predicts step s + 1 (the layouts here start with the special step)
    out = torch.full((*logits.shape[:-1], timesteps), special, dtype=logits.dtype, device=logits.device)
    for s, (qs, ts) in enumerate(steps[1:]):
        keep = ts < timesteps
        if bool(keep.any()):
            out[..., qs[keep], ts[keep]] = logits[..., qs[keep], s]
    return out


def loop_layout(n_q, timesteps):
    """The delayed layout as nested Python lists, one append per coordinate."""
    delays = list(range(n_q))
    layout = [[]]
    for step_t in range(timesteps + max(delays)):
        layout.append([(step_t - d, q) for q, d in enumerate(delays) if step_t - d >= 0])
    return layout


# ----------------------------------------------------------------------------- timing
def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and table build for ours)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)  # best of the repeats: the least disturbed by other processes


def row(name: str, loop_s: float, ours_s: float) -> None:
    print(f"{name:<34} loop {loop_s * 1e3:9.2f} ms   ours {ours_s * 1e3:8.3f} ms   ratio {loop_s / ours_s:8.1f}x")


def bench_provider(name, provider, z, args, device, logits: bool) -> None:
    pattern = provider.get_pattern(args.timesteps)
    steps = [(q.to(device), t.to(device)) for q, t in step_index(pattern.layout)]
    seq = pattern.build_pattern_sequence(z, 1024)[0]
    assert torch.equal(seq, loop_build(steps, z, 1024))
    assert torch.equal(pattern.revert_pattern_sequence(seq, -1)[0], loop_revert(steps, seq, -1, args.timesteps))
    print(f"-- {name}: S={pattern.num_steps} steps")
    row(
        f"{name} build_pattern_sequence",
        best_time(lambda: loop_build(steps, z, 1024), args.repeats, device),
        best_time(lambda: pattern.build_pattern_sequence(z, 1024), args.repeats, device),
    )
    row(
        f"{name} revert_pattern_sequence",
        best_time(lambda: loop_revert(steps, seq, -1, args.timesteps), args.repeats, device),
        best_time(lambda: pattern.revert_pattern_sequence(seq, -1), args.repeats, device),
    )
    if logits:  # logits are card times larger than codes: timed for one provider only
        out = torch.randn(args.batch, args.card, args.n_q, pattern.num_steps, device=device)
        nan = float("nan")
        ours = pattern.revert_pattern_logits(out, nan)[0]
        assert torch.allclose(ours, loop_revert_logits(steps, out, nan, args.timesteps), equal_nan=True)
        row(
            f"{name} revert_pattern_logits",
            best_time(lambda: loop_revert_logits(steps, out, nan, args.timesteps), args.repeats, device),
            best_time(lambda: pattern.revert_pattern_logits(out, nan), args.repeats, device),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-q", type=int, default=8)
    parser.add_argument("--timesteps", type=int, default=1500)
    parser.add_argument("--card", type=int, default=64, help="classes per code for the logits case")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"patterns benchmark: B={args.batch} K={args.n_q} T={args.timesteps} card={args.card} "
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}"
    )

    providers = {
        "delayed": DelayedPatternProvider(args.n_q),
        "unrolled": UnrolledPatternProvider(args.n_q),
        "musiclm": MusicLMPattern(args.n_q, group_by=2 if args.n_q % 2 == 0 else 1),
    }
    z = torch.randint(0, 1024, (args.batch, args.n_q, args.timesteps), device=device)
    for name, provider in providers.items():
        bench_provider(name, provider, z, args, device, logits=name == "delayed")

    # Making a new pattern (a new length): nested Python lists vs our tensor arithmetic,
    # plus the first (uncached) call that builds the index table.
    delayed = providers["delayed"]
    row(
        "delayed make layout",
        best_time(lambda: loop_layout(args.n_q, args.timesteps), args.repeats, torch.device("cpu")),
        best_time(lambda: delayed.make_pattern(args.timesteps), args.repeats, torch.device("cpu")),
    )

    def first_call():
        delayed.make_pattern(args.timesteps).build_pattern_sequence(z, 1024)

    row(
        "delayed new length, first build",
        best_time(
            lambda: loop_build(step_index(loop_layout_coords(args.n_q, args.timesteps)), z, 1024), args.repeats, device
        ),
        best_time(first_call, args.repeats, device),
    )


def loop_layout_coords(n_q, timesteps):
    from lightning_utils.patterns import LayoutCoord

    return [[LayoutCoord(t, q) for t, q in coords] for coords in loop_layout(n_q, timesteps)]


if __name__ == "__main__":
    main()
