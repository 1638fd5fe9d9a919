"""Training in several processes with PyTorch's own engine: torchrun starts them, DistributedDataParallel
averages the gradients (NCCL on GPUs, gloo on CPUs), and process 0 alone writes the run.

`python -m engine train --nproc N ...` re-launches itself under torchrun on this machine; for several machines
run torchrun directly (README). A job started without torchrun is a group of one: every method below is then
a no-op that returns its argument, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from engine.errors import EngineError

# Process 0 validates and writes while the others wait in a collective: give it time for a large validation set.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (it sets WORLD_SIZE and the rendezvous variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank() -> int:
    """This process's rank in its torchrun group (0 without torchrun)."""
    return int(os.environ.get("RANK", 0)) if under_torchrun() else 0


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs `python -m engine ARGV` in nproc processes on this machine (without ARGV's
    --nproc, which torchrun's own parser would take for an abbreviation of its --nproc-per-node)."""
    args, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "engine", *args]


@dataclass
class Group:
    """This process's place in the training group: its rank, the group's size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Process 0: the one that validates and writes the run folder, checkpoints and registry."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world_size > 1

    def share(self, value: Any) -> Any:
        """Process 0's value, in every process (a picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def agree(self, elapsed: float, stop: bool) -> tuple[float, bool]:
        """The group's clock (the largest elapsed time) and whether any process must stop: every process then
        follows the same learning-rate schedule and leaves the loop at the same step."""
        if not self.active:
            return elapsed, stop
        values = torch.tensor([elapsed, float(stop)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return float(values[0]), bool(values[1] > 0)

    def total(self, value: float) -> float:
        """The sum of value over the group (a throughput, say)."""
        if not self.active:
            return value
        values = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return float(values[0])

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel around model in a group, model itself alone."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def wait(self) -> None:
        """Wait until every process of the group gets here: none leaves (and drops its connections) while process
        0 still writes the end of the run."""
        if self.active:
            dist.barrier()

    def leave(self) -> None:
        """Close the process group (idempotent)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def end_process(code: int) -> NoReturn:
    """End this process of a torchrun group with `code` now, without the interpreter's teardown.

    DistributedDataParallel keeps the gloo group and its threads alive past destroy_process_group (torch 2.13),
    and such a thread that lets go of its last piece of work while the interpreter tears down aborts the process
    ("terminate called without an active exception", pytorch/pytorch#179291); torchrun then reports a finished
    run as failed. About 1 run in 20 of a bare two-process DDP script did so here (docs/BENCHMARKS.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def join(device: torch.device) -> Group:
    """Join the torchrun group this process belongs to (NCCL on CUDA, gloo on CPU), or a group of one."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Group(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise EngineError(f"torchrun started {local_world_size} processes on this machine but it has "
                              f"{torch.cuda.device_count()} GPU(s); use --nproc-per-node {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Group(rank, world_size, local_world_size, device)
