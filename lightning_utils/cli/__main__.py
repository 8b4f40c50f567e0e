"""``python -m lightning_utils.cli``: the same as the ``lightning-utils`` console script.

What it must never do: let a failure while tearing down the process group at exit replace the
exit code of the command that ran.
"""

import contextlib
import sys

from lightning_utils.cli import main

code = main()
# Under DDP every rank runs this module (Lightning re-launches the command line). Tear down the
# process group Lightning created before the interpreter exits: left to exit-time destructors,
# gloo's worker threads can abort the process ("terminate called without an active exception").
# Best effort: the run's result is already decided, so any error here is dropped.
with contextlib.suppress(Exception):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
sys.exit(code)
