"""`mt` with rank 1 raising in its second update: python rank_failure_driver.py MT-ARGS...

Run under torchrun by tests/train/test_distributed.py, to show that a failing rank ends the job.
"""

import sys

import mt.train.trainer
from mt.cli import main

real_update = mt.train.trainer.Trainer.update


def update(self, batches):
    if self.dist.rank == 1 and self.state.step == 1:
        raise RuntimeError("rank 1 exploded on purpose")
    return real_update(self, batches)


mt.train.trainer.Trainer.update = update
sys.exit(main(sys.argv[1:]))
