"""``python -m lightning_utils.cli``: the same as the ``lightning-utils`` console script."""

import sys

from lightning_utils.cli import main

code = main()
# Under DDP every rank runs this module (Lightning re-launches the command line). Tear down the
# process group Lightning created before the interpreter exits: left to exit-time destructors,
# gloo's worker threads can abort the process ("terminate called without an active exception").
try:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
except Exception:  # noqa: BLE001 - best effort at exit; the run's result is already decided
    pass
sys.exit(code)
