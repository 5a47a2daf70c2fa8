"""``torchrun`` worker of tests/ddp/test_ddp_training.py (not a test module).

Usage: ``torchrun --standalone --nproc_per_node 2 ddp_worker.py CONFIGS_JSON [KILLED_JSON]``: trains
each config of the JSON list in turn, then the optional last config, whose every rank kills itself
(SIGKILL) after the first batch of epoch 2, once epochs 0 and 1 are checkpointed.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import lightning as L

from medfuse.api import fit
from medfuse.config import validate


class Kill(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    for cfg in json.loads(sys.argv[1]):
        fit(validate(cfg))
    if len(sys.argv) > 2:
        fit(validate(json.loads(sys.argv[2])), callbacks=[Kill()])
