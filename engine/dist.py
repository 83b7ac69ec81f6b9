"""Process-group setup for a plain process, torchrun, and torch.distributed.launch (one or many nodes).

Every helper here is a no-op in a plain process, so no code path needs an unconditional barrier.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(local_rank_arg: int | None = None, device: str | None = None) -> DistEnv:
    """Initialise from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    ``torch.distributed.launch`` passes ``--local-rank``; torchrun sets LOCAL_RANK. NCCL on GPUs, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_on() else 0


def world_size() -> int:
    return dist.get_world_size() if is_on() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_true(flag: bool, device="cpu") -> bool:
    """True on every process if ``flag`` is true on any (used to stop all ranks together)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_sum(t)
    return bool(t.item() > 0)


def all_gather_object(obj) -> list:
    if not is_on():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_on():
        dist.barrier()


def cleanup() -> None:
    if is_on():
        dist.destroy_process_group()
