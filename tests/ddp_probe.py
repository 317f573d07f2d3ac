"""kernel.py under torchrun, counting DDP's gradient all-reduces (a torchrun child for
test_distributed.py): each rank prints how many backward passes synchronised gradients
and how many batches it trained."""
import os
import sys

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernel  # noqa: E402

synced, batches = [0], [0]


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def hook(state, bucket):
            if bucket.index() == 0:  # one count per synchronised backward pass
                synced[0] += 1
            return default_hooks.allreduce_hook(None, bucket)
        self.register_comm_hook(None, hook)


real_step = kernel.training_step


def counting_step(*args, **kwargs):
    batches[0] += 1
    return real_step(*args, **kwargs)


kernel.torch.nn.parallel.DistributedDataParallel = CountingDDP
kernel.training_step = counting_step
code = kernel.cli()
print(f"rank {os.environ['RANK']}: {synced[0]} gradient all-reduces in {batches[0]} batches", flush=True)
sys.exit(code)
