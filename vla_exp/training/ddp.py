"""Distributed data-parallel training: several processes (torchrun, or a SLURM job's tasks) train one model.

Every process reads the same global batch and draws the same noise, then trains on its own share of it; DDP
averages the gradients. Only rank 0 writes files, logs to W&B and prints. The training loop talks to `setup()`'s
object and never asks how many processes there are: for one, every operation does nothing.
"""
import math
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from vla_exp import UsageError


class OneProcess:
    rank, world, local_rank, is_main = 0, 1, 0, True

    def same_dir(self, run_dir, batch_size):
        return run_dir

    @contextmanager
    def rank0_first(self):
        """A block that fills a cache: under DDP rank 0 runs it first, the others read what it wrote."""
        yield

    def wrap(self, policy):
        return policy

    def part(self, n):
        """(the slice of a global batch of `n` this process trains on, how many samples it weighs)."""
        return slice(None), n

    def batch_loss(self, loss, weight, n):
        return loss

    def output_std(self, pred):
        """The std of the whole global batch's predicted noise."""
        return pred.std().item()

    def any(self, flag):
        """Whether `flag` holds in any process (a signal may reach some of them only)."""
        return flag

    def finish(self):
        pass


class Processes(OneProcess):
    def __init__(self):
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank, self.is_main = int(os.environ.get("LOCAL_RANK", 0)), self.rank == 0

    def same_dir(self, run_dir, batch_size):
        """Rank 0's run folder, for every process (Hydra names each one's folder by its own clock)."""
        if batch_size < self.world:
            raise UsageError(f"optim.batch_size={batch_size}: the global batch is split between {self.world} "
                             f"processes, so it must be at least {self.world}")
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def rank0_first(self):
        if not self.is_main:  # transformers saves a backbone on rank 0 only
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def wrap(self, policy):
        """The policy under DDP; some backbone outputs (CLIP's pooler) take no part in the loss."""
        return torch.nn.parallel.DistributedDataParallel(policy, find_unused_parameters=True)

    def part(self, n):
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return slice(lo, max(hi, lo + 1)), hi - lo  # left without samples by a short last batch: one, at weight 0

    def batch_loss(self, loss, weight, n):
        """This process's loss weighted so that DDP's average of the gradients is the gradient of the whole batch's
        mean loss, and carrying that mean as its value, so every process takes the same skip/scale decisions and
        logs the loss one process would."""
        weighted = loss * (weight * self.world / n)
        mean = weighted.detach().clone()
        dist.all_reduce(mean)
        return weighted + (mean / self.world - weighted).detach()

    def output_std(self, pred):
        x = pred.detach().double()
        sums = torch.stack([x.new_tensor(x.numel()), x.sum(), (x * x).sum()])
        dist.all_reduce(sums)
        n, total, squares = sums.tolist()
        return math.sqrt(max(squares - total * total / n, 0) / (n - 1))

    def any(self, flag):
        box = torch.tensor(float(flag), device=f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item())

    def finish(self):
        dist.destroy_process_group()


def rank():
    """This process's rank in its run: torchrun's, or a submitit task's before the run has exported it as torchrun's."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment
        return JobEnvironment().global_rank
    return int(os.environ.get("RANK", 0))


def setup():
    """The processes of this run. Several come from torchrun, or from a submitit job with several tasks
    (hydra/launcher=submitit_slurm or submitit_local with tasks_per_node > 1), whose variables submitit turns into
    torchrun's; the process group is joined here (NCCL on GPUs, gloo on CPUs)."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment
        env = TorchDistributedEnvironment()
        if env.world_size > 1:
            env.export(set_cuda_visible_devices=False)
    return Processes() if int(os.environ.get("WORLD_SIZE", 1)) > 1 else OneProcess()
