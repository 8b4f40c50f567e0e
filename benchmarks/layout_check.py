"""Did a refactor slow the hot paths down? The same measurements on two checkouts, interleaved.

    .venv/bin/python benchmarks/layout_check.py BEFORE_DIR AFTER_DIR [--rounds 3]

BEFORE_DIR and AFTER_DIR are two checkouts of this repository (``git worktree add /tmp/base REV``).
Each round runs one measurement pass per checkout in a fresh subprocess (PYTHONPATH set to the
checkout, one thread), alternating, and the medians are compared:

* ``.sft`` save and load of a checkpoint with 900 small tensors and a nested optimizer state
  (the skeleton encoder and decoder dominate);
* one CPU forward+backward of a 4-block MLP stack under ``apply_activation_offload``, and the
  same step over the stack without it, alternated in one process (``offload_over_plain``: what
  offloading costs, free of the several-percent drift between processes on a shared machine);
* ``ResumableDataLoader`` time per batch over a 64k-item ``RandomSampler`` (no Lightning).

It imports either layout (``lightning_utils.data`` or the old ``lightning_utils.samplers``), and
checks that every ``lightning_utils`` module it ran came from the checkout being measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

MEASURE = r"""
import json, os, sys, tempfile, time
# An editable install of the package (pip install -e) adds an import hook that resolves any
# lightning_utils module missing from the checkout on PYTHONPATH (the new layout's, in the old
# checkout) to the installed tree: drop it, so each checkout runs only its own code.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
import torch
torch.set_num_threads(1)
out = {}
try:
    from lightning_utils.io import save_state, load_state
except ImportError:
    raise
# .sft: many small tensors + a nested skeleton (decode-heavy)
g = torch.Generator().manual_seed(0)
state = {"state_dict": {f"layer{i}.weight": torch.randn(16, 16, generator=g) for i in range(300)},
         "optimizer_states": [{"state": {i: {"step": torch.tensor(5.0), "exp_avg": torch.randn(16, 16, generator=g), "exp_avg_sq": torch.rand(16, 16, generator=g)} for i in range(300)},
                               "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(300)), "weight_decay": 0.01}]}],
         "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 2}}}}, "epoch": 2, "global_step": 500}
d = tempfile.mkdtemp()
p = os.path.join(d, "s.sft")
ts, tl = [], []
for _ in range(15):
    t0 = time.perf_counter(); save_state(state, p); ts.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); load_state(p); tl.append(time.perf_counter() - t0)
out["sft_save_ms"] = 1e3 * sorted(ts)[len(ts) // 2]
out["sft_load_ms"] = 1e3 * sorted(tl)[len(tl) // 2]
# offload: CPU step of a 4-block MLP stack
from torch import nn
try:
    from lightning_utils.modules.offload import apply_activation_offload
except ImportError:
    from lightning_utils.offload import apply_activation_offload
class Block(nn.Module):
    def __init__(self, d=256):
        super().__init__(); self.a = nn.Linear(d, 4 * d); self.b = nn.Linear(4 * d, d)
    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))
torch.manual_seed(0)
m = nn.Sequential(*[Block() for _ in range(4)])
plain = nn.Sequential(*[Block() for _ in range(4)])
apply_activation_offload(m, Block)
x = torch.randn(64, 256)
for _ in range(3):
    m(x).sum().backward(); plain(x).sum().backward()
tt, tp = [], []
for _ in range(30):  # alternated with the same stack without offload, in this process
    t0 = time.perf_counter(); m(x).sum().backward(); tt.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); plain(x).sum().backward(); tp.append(time.perf_counter() - t0)
out["offload_step_ms"] = 1e3 * sorted(tt)[len(tt) // 2]
out["offload_over_plain"] = sorted(tt)[len(tt) // 2] / sorted(tp)[len(tp) // 2]
# loader: per-batch time without Lightning
try:
    from lightning_utils.data import ResumableDataLoader, RandomSampler
except ImportError:
    from lightning_utils.dataloader import ResumableDataLoader
    from lightning_utils.samplers import RandomSampler
from torch.utils.data import TensorDataset
ds = TensorDataset(torch.arange(64000))
tl = []
for _ in range(5):
    dl = ResumableDataLoader(ds, batch_size=32, sampler=RandomSampler(len(ds), seed=0))
    t0 = time.perf_counter(); n = sum(1 for _ in dl); tl.append((time.perf_counter() - t0) / n)
out["loader_us_per_batch"] = 1e6 * sorted(tl)[len(tl) // 2]
tree = os.environ["PYTHONPATH"]
foreign = sorted(m.__file__ for n, m in list(sys.modules.items())
                 if n.startswith("lightning_utils") and getattr(m, "__file__", None) and not m.__file__.startswith(tree))
if foreign:
    sys.exit(f"modules from outside {tree}: {foreign}")
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    trees = {"before": args.before, "after": args.after}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            env = {"PYTHONPATH": tree, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, cwd="/tmp")
            if done.returncode:
                sys.exit(done.stderr)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = list(runs["after"][0])
    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in keys} for n in trees}
    print(f"{'':14s}" + "".join(f"{k:>22s}" for k in keys))
    for n in trees:
        print(f"{n:14s}" + "".join(f"{med[n][k]:22.3f}" for k in keys))
    print(f"{'after/before':14s}" + "".join(f"{med['after'][k] / med['before'][k]:22.3f}" for k in keys))


if __name__ == "__main__":
    main()
