"""Runs of the demo trained in worker processes, one torch thread each (``--workers``).

The demo's tensors are small (a few scenes of 48x48 pixels), so intra-op threads do not pay:
one run on one thread is faster here than on two. Separate runs in separate processes use the
cores instead. A module of its own because spawned workers must import what they run, which
``__main__`` under ``python -m`` does not allow.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional, Sequence

import torch

from .data import DigitScenes
from .model import VARIANTS
from .train import TrainConfig, train_variant

_WORKER: dict = {}


def train_semi(name: str, seed: int, scenes: DigitScenes, train_cfg: TrainConfig, device: torch.device,
               on_step: Callable[[], None]):
    """One run of the semi-supervised experiment (the default job of :func:`run_in_workers`)."""
    return train_variant(VARIANTS[name], scenes, train_cfg, seed, device, on_step=on_step)


def _init_worker(scenes, train_cfg: TrainConfig, steps_done) -> None:
    torch.set_num_threads(1)
    _WORKER.update(scenes=scenes, train_cfg=train_cfg, steps_done=steps_done)


def _worker_job(fn: Callable, args: tuple):
    steps_done, pending = _WORKER["steps_done"], [0]

    def on_step() -> None:  # report in chunks: one queue message per step would cost more than the step
        pending[0] += 1
        if pending[0] == 25:
            steps_done.put(pending[0])
            pending[0] = 0

    result = fn(*args, _WORKER["scenes"], _WORKER["train_cfg"], torch.device("cpu"), on_step)
    steps_done.put(pending[0])
    return result


def run_in_workers(jobs: Sequence[tuple], scenes, train_cfg: TrainConfig, workers: int, bar,
                   fn: Optional[Callable] = None) -> list:
    """Train ``jobs`` on the CPU in ``workers`` processes: each job is the tuple of first
    arguments of ``fn`` (a module-level function, so that workers can import it), which is then
    called as ``fn(*job, scenes, train_cfg, device, on_step)``; the default ``fn`` is
    :func:`train_semi` and its jobs are ``(variant, seed)`` pairs. The results come back in the
    order of ``jobs``; ``bar`` (tqdm) counts the steps and ``fn``'s results must have a
    ``test_miou``."""
    fn = fn or train_semi
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    steps_done = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(scenes, train_cfg, steps_done)) as pool:
        futures = [pool.submit(_worker_job, fn, tuple(job)) for job in jobs]
        try:
            pending = set(futures)
            while pending:
                try:
                    bar.update(steps_done.get(timeout=0.5))
                except queue.Empty:
                    pass
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    miou = f.result().test_miou  # a worker's exception is raised here
                    bar.set_postfix_str(f"{len(futures) - len(pending)}/{len(futures)} runs done, last mIoU {miou:.3f}")
        except BaseException:  # an error or Ctrl-C: do not train the queued runs first
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        while True:  # the last chunks of the step count
            try:
                bar.update(steps_done.get_nowait())
            except queue.Empty:
                break
        return [f.result() for f in futures]
