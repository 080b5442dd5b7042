"""Who this process is: (rank, world size) and (DataLoader worker, workers), read one way everywhere."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size): torch.distributed's if initialised, else $RANK/$WORLD_SIZE, else (0, 1).

    Read when a dataset is built, in the main process: DataLoader workers started by spawn
    have no process group, so asking there would make every rank read everything.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))), int(
        os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))
    )


def dataloader_worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker calling this; (0, 1) outside one."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def launcher_rank() -> int:
    """This process's global rank as its launcher set it (torchrun's RANK, SLURM's
    SLURM_PROCID, Lightning's LOCAL_RANK for the processes it starts), before any process
    group exists: what decides who writes a run's shared files."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def local_device() -> torch.device:
    """This process's device: its own GPU (one process per GPU; LOCAL_RANK from torchrun) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
