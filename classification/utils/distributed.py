"""Distributed helpers: torchrun (``env://``) initialisation, rank queries, reductions."""
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


class MainRankFailedError(RuntimeError):
    """Raised on the other ranks when work that rank 0 does alone (writing the run's files) failed there; rank 0 raises
    its own error, which says what went wrong."""


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process runs.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: The device this process computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that logs and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_distributed() -> DistributedContext:
    """Initialises the process group when launched by torchrun (``RANK``/``WORLD_SIZE`` set), else a single process.

    The backend is NCCL when CUDA is available, gloo otherwise. Each process uses GPU ``LOCAL_RANK``.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place, returned for convenience."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum over processes, in place, returned for convenience."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is True on any process (the same answer on every process)."""
    return all_reduce_min(torch.tensor(float(not flag), device=device)).item() == 0


def average_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Averages the BatchNorm running means and variances over processes, in place, in one all-reduce (a no-op in one
    process or without BatchNorm).

    DDP keeps the parameters equal on every process, but each BatchNorm layer tracks the statistics of its own
    process's batches (DDP overwrites them with rank 0's at each forward; an EMA copy, outside DDP, keeps its own).
    """
    if not is_distributed():
        return
    statistics = [statistic for module in model.modules()
                  if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
                  for statistic in (module.running_mean, module.running_var)]
    if not statistics:
        return
    flat = torch.cat([statistic.reshape(-1) for statistic in statistics])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    for statistic, averaged in zip(statistics, flat.split([statistic.numel() for statistic in statistics])):
        statistic.copy_(averaged.view_as(statistic))


def all_gather_objects(obj: object) -> list:
    """Gathers one picklable object per process, ordered by rank."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    """Returns rank ``src``'s object on every process."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def on_main_rank(is_main: bool, work: Callable[[], T], share_result: bool = False) -> T | None:
    """Collective: rank 0 does ``work`` (say, writes or reads the run's files), and every rank learns whether it
    failed. Rank 0 raises its own error, the others :class:`MainRankFailedError` naming it: no rank is left waiting
    in a later collective for a rank 0 that has gone (under gloo it would die with the transport's traceback).

    Returns:
        ``work``'s result on rank 0; on the other ranks too with ``share_result`` (it must pickle), else None.
    """
    result, error = None, None
    if is_main:
        try:
            result = work()
        except BaseException as err:  # re-raised below (Ctrl-C too), once the other ranks have heard of it
            error = err
    failure = None if error is None else f"{type(error).__name__}: {error}"
    failure, shared = broadcast_object((failure, result if share_result else None))
    if error is not None:
        raise error
    if failure is not None:
        raise MainRankFailedError(f"stopped because rank 0 failed ({failure}); rank 0's log says more")
    return result if is_main else shared


def cleanup() -> None:
    """Destroys the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
