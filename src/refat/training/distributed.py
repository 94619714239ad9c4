"""Data-parallel plumbing: which process am I, and let the main process do shared work first.

``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the process group
is started on first use (gloo on CPU, nccl on GPU, each process on GPU number LOCAL_RANK) so the same
script runs alone or data parallel. The trainer's ``accelerate.Accelerator`` finds this group and uses it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..models import auto_device

__all__ = ["main_process_first", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size, starting the process group when launched data parallel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(auto_device())  # before nccl starts: else every rank's collectives use GPU 0
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds and writes a cache); the others run it after, finding
    the cache. Alone, it is a no-op."""
    rank, world = rank_and_world()
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    try:
        yield
    finally:
        if world > 1 and rank == 0:
            torch.distributed.barrier()
