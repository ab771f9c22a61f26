"""`longreach serve --tensor-parallel-size N`: the server starts its own tensor-parallel workers.

`engine/tp.py` runs every rank's engine in lock-step (SPMD): each rank must add the same requests, abort the
same ones and step at the same moments. Under the server only rank 0 hears HTTP, so rank 0's engine is
wrapped in a `MirroredEngine` that broadcasts each call that changes the engine (add_request, abort, step)
to the other ranks before making it; the other ranks `follow` those calls on their shard of the model and
take part in the step's collectives. The calls travel on a gloo group of their own (on GPUs the model's
collectives use NCCL), with a long timeout so an idle server does not time its workers out.

Processes: without torchrun's variables (`RANK`, `WORLD_SIZE`), `spawn_workers` starts ranks 1..N-1 with
`multiprocessing` (spawn) on this machine, with a free loopback port for the rendezvous, and this process
becomes rank 0. Under `torchrun --nproc-per-node N longreach serve ... --tensor-parallel-size N` nothing is
spawned: rank 0 serves and the others follow.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

logger = logging.getLogger("longreach.serve")

CONTROL_TIMEOUT = timedelta(
    days=365
)  # the workers wait for rank 0's next call for as long as the server idles
_MIRRORED = ("add_request", "abort", "step")


class MirroredEngine:
    """Rank 0's engine as the server sees it: reads go straight to the engine; add_request, abort and step
    are first broadcast to the other ranks, which make the same call (see the module docstring)."""

    def __init__(self, engine, group):
        self._engine, self._group = engine, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _broadcast(self, name: str, args: tuple, kwargs: dict) -> None:
        dist.broadcast_object_list([(name, args, kwargs)], src=0, group=self._group)

    def add_request(self, *args, **kwargs):
        self._broadcast("add_request", args, kwargs)
        return self._engine.add_request(*args, **kwargs)

    def abort(self, *args, **kwargs):
        self._broadcast("abort", args, kwargs)
        return self._engine.abort(*args, **kwargs)

    def step(self, *args, **kwargs):
        self._broadcast("step", args, kwargs)
        return self._engine.step(*args, **kwargs)

    def close(self) -> None:
        """Tell the other ranks to stop following (they return from `follow`)."""
        self._broadcast("exit", (), {})


def control_group():
    """The gloo group the calls travel on; every rank must call this, after the default group exists."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def follow(engine, group) -> int:
    """Ranks 1..N-1: make each call rank 0 broadcasts until it says exit; returns the number of calls made.
    A call that raises here raised on rank 0 too (same requests, same engine state), which answered it."""
    num_calls = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        name, args, kwargs = box[0]
        if name == "exit":
            return num_calls
        if name not in _MIRRORED:
            raise RuntimeError(f"rank {dist.get_rank()}: unknown call {name!r} from rank 0")
        try:
            getattr(engine, name)(*args, **kwargs)
        except Exception:  # noqa: BLE001  (rank 0 met the same error and reported it)
            logger.debug("rank %d: %s failed as on rank 0", dist.get_rank(), name, exc_info=True)
        num_calls += 1


def is_launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def worker_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """torch.distributed's env:// rendezvous for one rank on this machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_workers(world_size: int, target: Callable[[Any], None], args: Any) -> list:
    """Start ranks 1..world_size-1 as spawned processes running `target(args)` and make this process rank 0
    (its environment gets the rendezvous variables). Returns the processes (daemons: they end with us)."""
    port = free_port()
    context = multiprocessing.get_context("spawn")
    processes = []
    for rank in range(1, world_size):
        process = context.Process(
            target=_worker_entry,
            args=(worker_environment(rank, world_size, port), target, args),
            name=f"longreach-tp-rank{rank}",
            daemon=True,
        )
        process.start()
        processes.append(process)
    os.environ.update(worker_environment(0, world_size, port))
    return processes


def _worker_entry(environment: dict[str, str], target: Callable[[Any], None], args: Any) -> None:
    os.environ.update(environment)
    target(args)


def join_workers(processes: list, timeout: float = 30.0) -> None:
    """Wait for the workers to leave after `MirroredEngine.close`; end any that do not."""
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            logger.warning("tensor-parallel worker %s did not exit; terminating it", process.name)
            process.terminate()
            process.join(5)
