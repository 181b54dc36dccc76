"""`depmatch.train` through accelerate's FSDP2 path on CPU ranks, for the tests only.

Accelerate switches FSDP on only for GPU-like distributed types (its state.py leaves out
MULTI_CPU), yet FSDP2's `fully_shard` itself runs on CPU with gloo. Relabelling the CPU
process group as MULTI_GPU before the Accelerator is made lets CI run the same
`prepare`, sharded save/load and consolidation code that a GPU launch runs.
"""

import sys

import accelerate.state
from accelerate.utils import DistributedType

_original_init = accelerate.state.PartialState.__init__


def _init_as_if_on_gpus(self, cpu: bool = False, **kwargs):
    _original_init(self, cpu, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU


accelerate.state.PartialState.__init__ = _init_as_if_on_gpus

if __name__ == "__main__":
    from depmatch.train import main

    sys.exit(main(sys.argv[1:]))
