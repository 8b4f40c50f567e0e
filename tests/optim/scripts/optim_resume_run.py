"""Train TinyLM with ApolloMini for --max-steps, recording the parameters after every step.

Run by tests/optim/test_optim_lightning.py, each time in a fresh interpreter:
  full run:   --save-dir D --suffixes .ckpt,.sft
                                           saves a checkpoint per suffix at the end of epoch 0
                                           (step 5, in the middle of a projection gap of 2)
  resumed:    --resume CKPT --seed 1234    resumes from one under a different global seed
The recorded parameters of the shared steps must be bit-identical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # optim_lm, next to this file
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for helpers

import lightning as L
import torch
from helpers.lightning import cpu_trainer
from optim_lm import VOCAB, TinyLM, TokenData


class StepDataLM(TinyLM):
    """Draws each batch from the global step, not from the loader position.

    Lightning 2.6 replays one batch when resuming from a checkpoint written at an epoch end
    (seen with ModelCheckpoint too), which would confound the optimizer comparison.
    """

    def training_step(self, batch, batch_idx):
        gen = torch.Generator().manual_seed(self.global_step)
        start = torch.randint(0, VOCAB, (8, 1), generator=gen)
        return super().training_step(((start + torch.arange(9)) % VOCAB,), batch_idx)


class Recorder(L.Callback):
    def __init__(self, save_dir: Path | None, suffixes: list[str]) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.save_dir, self.suffixes = save_dir, suffixes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module):
        if self.save_dir is not None and trainer.current_epoch == 0:
            for suffix in self.suffixes:
                trainer.save_checkpoint(self.save_dir / f"epoch0{suffix}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-dir", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suffixes", default=".ckpt", help="checkpoint suffixes to save (comma list)")
    args = parser.parse_args()
    suffixes = args.suffixes.split(",")

    plugins = []
    # Lightning's own CheckpointIO unless a .sft file is written or read (the plugin writes
    # .ckpt files in torch's format too)
    if (".sft" in suffixes and args.save_dir is not None) or (args.resume is not None and args.resume.suffix == ".sft"):
        from lightning_utils.plugins import SafetensorsCheckpointIO

        plugins.append(SafetensorsCheckpointIO())
    model = StepDataLM(update_proj_gap=2)
    L.seed_everything(args.seed)  # the resumed run uses a different global RNG state
    torch.randn(args.seed % 97 + 1)  # and a different position in the stream
    recorder = Recorder(args.save_dir, suffixes)
    trainer = cpu_trainer(args.out.parent, callbacks=[recorder], max_steps=args.max_steps, plugins=plugins)
    trainer.fit(model, datamodule=TokenData(n=40, batch_size=8), ckpt_path=args.resume)
    torch.save(recorder.params, args.out)


if __name__ == "__main__":
    main()
