"""Data-parallel training on torch.distributed: torchrun's environment, sharding, reductions, relaunching.

One process is the degenerate case: every helper here is then a no-op, so `fit` reads the same either way.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job, as torchrun describes it in RANK, WORLD_SIZE, LOCAL_RANK, ..."""

    rank: int = 0  # global rank; 0 alone writes the run folder
    world: int = 1  # processes in the job, over all nodes
    local_rank: int = 0  # rank on this node; picks the GPU
    local_world: int = 1  # processes on this node; they share its cores

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def ranks_from_env(env: dict | None = None) -> Ranks:
    """The job layout from torchrun's environment variables (one process when they are absent)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    return Ranks(rank=int(env.get("RANK", 0)), world=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                 local_world=int(env.get("LOCAL_WORLD_SIZE", world)))


@contextlib.contextmanager
def process_group(ranks: Ranks, device: str) -> Iterator[str]:
    """Join the job's process group (gloo on CPU, nccl on CUDA) for the block; yields this rank's device."""
    if not ranks.active:
        yield device
        return
    if device == "cuda":
        device = f"cuda:{ranks.local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
        dist.barrier()  # no rank tears down its side while another still talks (not after an error: it would hang)
    finally:
        dist.destroy_process_group()


def threads_per_rank(threads: int, ranks: Ranks) -> int:
    """Torch threads for this process: as asked, else the node's cores shared among its ranks."""
    return threads or max(1, (os.cpu_count() or 1) // ranks.local_world)


def check_batch(batch_size: int, world: int) -> None:
    """The global batch must split evenly over the processes, so every step sees exactly batch_size images."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                         f"{world} processes (e.g. {max(world, batch_size // world * world)})")


def shard(perm: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice perm[rank::world] of an epoch's permutation, and which entries are real samples.

    The permutation is padded by wrapping around to a multiple of world (as DistributedSampler does), so
    every rank takes the same number of steps; the padded repeats train but are left out of the metrics.
    """
    n = len(perm)
    size = -(-n // world)  # ceil(n / world): samples per rank
    pos = torch.arange(rank, size * world, world)  # positions in the padded permutation
    return perm[pos % n], pos < n


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The augmentation/dropout seed of (seed, epoch, rank); rank 0 keeps the one-process stream unchanged."""
    if rank == 0:
        return seed * 1_000_003 + epoch
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)


def all_sum(values: list[float], ranks: Ranks, device: str) -> list[float]:
    """Sum numbers over all ranks (float64, so counts stay exact)."""
    if not ranks.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast(obj: T, ranks: Ranks) -> T:
    """Rank 0's (picklable) object, on every rank."""
    if not ranks.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here."""
    if ranks.active:
        dist.barrier()


def leaders_first(ranks: Ranks, leader: bool, fn: Callable[[], T]) -> T | None:
    """Run fn on the leader ranks while the others wait; leaders get its result, the others None.

    Used so that rank 0 claims the run folder, or fills the cache that the others then read, before they go
    on. A leader's error reaches every rank, instead of leaving the others waiting: they leave with exit
    status 2 and no message, since the leader reports the error itself.
    """
    if not ranks.active:
        return fn()
    result, error = None, None
    if leader:
        try:
            result = fn()
        except Exception as e:  # re-raised below, once the others know
            error = e
    flags = [None] * ranks.world  # every rank's "I failed"
    dist.all_gather_object(flags, error is not None)
    if error is not None:
        raise error
    if any(flags):
        raise SystemExit(2)
    return result


def without_nproc(argv: list[str]) -> list[str]:
    """argv less its --nproc N (or --nproc=N, or an abbreviation argparse accepts, like --np N)."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif name.startswith("--np") and "--nproc".startswith(name):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that re-runs `catdog ARGV` (less --nproc) as nproc processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "-m", "catdog", *without_nproc(argv)]
