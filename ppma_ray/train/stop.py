"""Graceful stop: the job turns SIGTERM / SIGINT into a request that the training workers see at
their next log step (``run.log_every``); they write a checkpoint there and return, and the job
exits 143 / 130 saying where it stopped. Re-running the same command resumes from that checkpoint.

Preemption: when Ray Train learns that a node of the run is about to be reclaimed (a spot instance,
a preemptible VM, a drained node; ``ray.train.get_preemption_info``), the workers write a
checkpoint at their next log step and train on; when the node goes, Ray Train restarts the run
from that checkpoint (``run.max_preemption_failures`` times, apart from ``run.max_failures``).

The request travels through a small named actor, not a file: every rank must stop at the same
step (DDP), so the ranks read it at the same log step and agree by an all-reduce.
"""

from __future__ import annotations

import functools
import signal
import sys
from contextlib import contextmanager

import ray
import torch

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


@ray.remote(num_cpus=0)
class StopFlag:
    def __init__(self):
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        self.signum = self.signum or signum

    def get(self) -> int | None:
        return self.signum


class StoppedBySignal(Exception):
    """A stage stopped early on a signal; its last checkpoint holds the state to resume from."""

    def __init__(self, signum: int, stage: str, summary: dict):
        self.signum, self.stage, self.summary = signum, stage, summary
        super().__init__(f"stopped by {signal.Signals(signum).name} during stage {stage} at step {summary.get('steps')}; "
                         f"checkpoint {summary.get('checkpoint')}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


@contextmanager
def graceful_stop(name: str):
    """In the job's main thread: SIGTERM and SIGINT set the flag ``name`` (yielded) instead of
    killing the job; a second signal kills it as before."""
    flag = StopFlag.options(name=name, get_if_exists=True).remote()

    def handler(signum, frame):
        for s in EXIT_CODES:
            signal.signal(s, previous[s])
        flag.set.remote(signum)
        print(f"{signal.Signals(signum).name}: stopping at the next log step with a checkpoint "
              "(again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield name
    finally:
        for s, h in previous.items():
            if signal.getsignal(s) is handler:
                signal.signal(s, h)
        ray.kill(flag)


@functools.lru_cache(maxsize=4)
def _flag(name: str):
    """The flag's handle, looked up once per process (``requested`` runs at every log step)."""
    return ray.get_actor(name)


def requested(name: str | None, world: int, device: torch.device) -> bool:
    """On every rank at the same step: has the job asked to stop? (Ranks may read the flag a moment
    apart, so they agree on the maximum.)"""
    if name is None:
        return False
    wanted = torch.tensor(float(ray.get(_flag(name).get.remote()) is not None), device=device)
    if world > 1:
        torch.distributed.all_reduce(wanted, op=torch.distributed.ReduceOp.MAX)
    return bool(wanted.item())


def preemption_notice() -> str | None:
    """At the same step on every rank (a collective): a line naming the nodes Ray Train says are
    about to be preempted, and the deadline; None while there is no notice."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return None
    import time

    left = f", {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s before the deadline" if info.deadline_ms else ""
    return f"node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} (ranks {info.preempted_ranks}) will be preempted{left}"


def signalled(name: str | None) -> int | None:
    """The signal the job got (None: none), read after the stage returned."""
    return ray.get(ray.get_actor(name).get.remote()) if name else None
