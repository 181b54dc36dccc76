"""`depmatch.train` whose rank FAIL_RANK raises inside step FAIL_STEP, for the tests only: what an
out-of-memory or a device error on one rank does to a run of several."""

import os
import sys

from depmatch.engine.trainer import Trainer

_compute_loss = Trainer.compute_loss


def _compute_loss_failing_once(self, labeled, unlabeled):
    failing_rank, failing_step = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])
    if self.accelerator.process_index == failing_rank and self.state.step + 1 == failing_step:
        raise RuntimeError(f"CUDA out of memory (raised by {__file__} in step {failing_step})")
    return _compute_loss(self, labeled, unlabeled)


Trainer.compute_loss = _compute_loss_failing_once

if __name__ == "__main__":
    from depmatch.train import main

    sys.exit(main(sys.argv[1:]))
