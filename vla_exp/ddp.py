"""Distributed data-parallel training: several processes (torchrun, or a SLURM job's tasks) train one model.

Every process reads the same global batch and draws the same noise, then trains on its own share of it; DDP
averages the gradients. Only rank 0 writes files, logs to W&B and prints.
"""
import math
import os

import torch
import torch.distributed as dist

from vla_exp import UsageError


def setup():
    """(rank, world size, local rank). Several processes come from torchrun, or from a submitit job with several
    tasks (hydra/launcher=submitit_slurm or submitit_local with tasks_per_node > 1), whose variables submitit turns
    into torchrun's; the process group is joined here (NCCL on GPUs, gloo on CPUs). One process: (0, 1, 0)."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment
        env = TorchDistributedEnvironment()
        if env.world_size > 1:
            env.export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def same_dir(run_dir, world, batch_size):
    """Rank 0's run folder, for every process (Hydra names each one's folder by its own clock)."""
    if batch_size < world:
        raise UsageError(f"optim.batch_size={batch_size}: the global batch is split between {world} processes, so "
                         f"it must be at least {world}")
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    dist.barrier()


def wrap(policy):
    """The policy under DDP; some backbone outputs (CLIP's pooler) take no part in the loss."""
    return torch.nn.parallel.DistributedDataParallel(policy, find_unused_parameters=True)


def whole_batch_loss(loss, n_share, n, world):
    """Under DDP: this process's loss weighted so that DDP's average of the gradients is the gradient of the whole
    batch's mean loss, and carrying that mean as its value, so every process takes the same skip/scale decisions and
    logs the loss one process would."""
    weighted = loss * (n_share * world / n)
    mean = weighted.detach().clone()
    dist.all_reduce(mean)
    return weighted + (mean / world - weighted).detach()


def output_std(pred, world):
    """The std of the whole global batch's predicted noise (under DDP, from every process's sums)."""
    if world == 1:
        return pred.std().item()
    x = pred.detach().double()
    sums = torch.stack([x.new_tensor(x.numel()), x.sum(), (x * x).sum()])
    dist.all_reduce(sums)
    n, total, squares = sums.tolist()
    return math.sqrt(max(squares - total * total / n, 0) / (n - 1))


def finish():
    dist.destroy_process_group()
