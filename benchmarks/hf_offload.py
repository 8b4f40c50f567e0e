"""ActivationOffload on a stock Hugging Face model vs Hugging Face's own gradient checkpointing.

A LLaMA built from a config (grouped-query attention, dropout on, ``use_cache`` left at its
default ``True``), trained with AdamW on CPU. Variants, interleaved step by step on the same
batches: ``plain``; ``hf_checkpointing`` (``model.gradient_checkpointing_enable()``: torch's
non-reentrant checkpoint per decoder layer); ``offload`` (``ActivationOffload(target=
LlamaDecoderLayer)``); ``offload_compiled`` (plus ``CompileModules(target=LlamaDecoderLayer,
backend="aot_eager")``: each layer's forward compiled inside its checkpoint).

It prints, against ``plain``:

* the largest gradient difference (both checkpointings must match the plain model's gradients;
  the defaults hand every layer a ``DynamicCache``, which a recompute must not fill twice);
* the bytes autograd keeps for backward after the forward (each storage counted once with
  ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded; device-independent, so a
  CUDA run keeps the same amounts, minus the offloaded inputs that go to host memory);
* the median step time (forward, backward, AdamW) ratio. On CPU this shows the recompute cost,
  not the CUDA overlap of host copies.

Usage: ``python benchmarks/hf_offload.py [--layers 4 --hidden 256 --seq 256 --batch 4 --steps 6]``
(about a minute on 2 cores; needs the ``hf`` extra).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch


def build(args):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
        attention_dropout=0.1,
    )
    return transformers.LlamaForCausalLM(config).train()


class SavedBytes:
    """Bytes of the storages autograd saves while the hooks are on, each counted once."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def total(self) -> int:
        return sum(self.seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the cache warning, once per variant: it is what we measure around

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_utils.callbacks import ActivationOffload, CompileModules

    base = build(args)
    variants = {}
    for name in ("plain", "hf_checkpointing", "offload", "offload_compiled"):
        model = copy.deepcopy(base)
        if name == "hf_checkpointing":
            model.gradient_checkpointing_enable()
        if name.startswith("offload"):
            ActivationOffload(target=LlamaDecoderLayer).apply(model)
        if name == "offload_compiled":
            CompileModules(target=LlamaDecoderLayer, backend="aot_eager").apply(model)
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps + 1)]
    times: dict[str, list[float]] = {n: [] for n in variants}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, int] = {}
    for step, ids in enumerate(batches):  # step 0 warms up (and compiles)
        for name, (model, opt) in variants.items():
            counter = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})

            # torch's non-reentrant checkpoint keeps each layer's inputs without saving them
            # through the hooks: count every layer's input storage too (once, like the rest)
            def count_input(module, args, kwargs, counter=counter):
                counter.pack(args[0] if args else kwargs["hidden_states"])

            handles = [
                m.register_forward_pre_hook(count_input, with_kwargs=True)
                for m in model.modules()
                if isinstance(m, LlamaDecoderLayer)
            ]
            torch.manual_seed(step)
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            for handle in handles:
                handle.remove()
            if step == 0:
                grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                saved[name] = counter.total()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step > 0:
                times[name].append(time.perf_counter() - start)

    mib = 2.0**20
    plain_time = statistics.median(times["plain"])
    print(
        f"LLaMA {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
        f"fp32, CPU, {args.steps} steps (median)"
    )
    print(f"{'variant':<18} {'max |grad diff|':>15} {'saved for backward':>19} {'step time':>10} {'vs plain':>9}")
    for name in variants:
        diff = max(float((grads[name][k] - v).abs().max()) for k, v in grads["plain"].items())
        median = statistics.median(times[name])
        print(
            f"{name:<18} {diff:>15.2e} {saved[name] / mib:>15.1f} MiB {median * 1e3:>8.0f}ms "
            f"{median / plain_time:>8.2f}x"
        )


if __name__ == "__main__":
    main()
