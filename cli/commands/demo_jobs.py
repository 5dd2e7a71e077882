"""The demo's SFTs trained side by side: each one starts as soon as what it needs exists.

Why: the demo's language SFTs take 9 000 small steps, most of its time, and a toy-sized step is fastest on
one thread, so two cores are best used by training two SFTs at once, in two processes. The order is the
method's own: a task SFT starts from its method's source-language SFT, and a language's LT-SFT run waits
for its DEFT-X run, whose phase 1 it takes from the shared full-phase cache instead of training it again.
Each SFT is computed as it would be alone (its own seeds, one thread), so the numbers do not depend on
the number of workers.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.training.trainer import NullReporter

JobKey = tuple[str, str]  # (language code or task name, method)


@dataclass(frozen=True)
class Job:
    key: JobKey
    label: str  # what the progress bar shows
    config: Any  # a TrainConfig
    data: dict[str, Any]  # train_sft's train_data / validation_data
    needs: tuple[JobKey, ...] = ()  # jobs that must have finished first
    source: JobKey | None = None  # the job whose SFT a task SFT starts from (one of ``needs``)
    source_lineage: dict[str, Any] | None = field(default=None, compare=False)


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int,
    directory: Path,
    full_phase_cache: Path,
    reporter_for: Callable[[Job], Any],
    finished: Callable[[Job, Path, list[str]], None],
    lineage_of: Callable[[JobKey], dict[str, Any]],
) -> None:
    """Train every job, its SFT saved in ``directory/<name>-<method>``, at most ``workers`` at once.

    Jobs start in list order among those whose ``needs`` have finished (the list is a priority order and
    must list every job after its needs). ``finished(job, sft_directory, phases)`` runs here, in this
    process, as each job ends (``phases``: the phases the trainer ran, without ``full`` when phase 1 came
    from the cache); ``lineage_of(key)`` gives a task job its source SFT's registry lineage when it starts;
    ``reporter_for(job)`` receives the job's progress (``phase_started``, ``step``).
    """
    _check_order(jobs)
    if workers <= 1:
        for job in jobs:
            job = _with_lineage(job, lineage_of)
            recorder = _PhaseRecorder(reporter_for(job))
            train_job(job, directory, full_phase_cache, recorder)
            finished(job, output_directory(directory, job.key), recorder.phases)
        return
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    events = context.Queue()
    reporters: dict[JobKey, Any] = {}
    waiting = list(jobs)
    running: dict[Future, Job] = {}
    done: set[JobKey] = set()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(events,)) as pool:
        try:
            while waiting or running:
                ready = [job for job in waiting if set(job.needs) <= done][: workers - len(running)]
                for job in ready:
                    waiting.remove(job)
                    reporters[job.key] = reporter_for(job)
                    job = _with_lineage(job, lineage_of)
                    running[pool.submit(_train_in_worker, job, directory, full_phase_cache)] = job
                ended, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                _forward_events(events, reporters)
                for future in ended:
                    job = running.pop(future)
                    phases = future.result()
                    reporters.pop(job.key)
                    done.add(job.key)
                    finished(job, output_directory(directory, job.key), phases)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _check_order(jobs: Sequence[Job]) -> None:
    """Every job after its needs: one worker runs the list as it is, and two never wait for a job not listed."""
    listed: set[JobKey] = set()
    for job in jobs:
        missing = set(job.needs) - listed
        if missing:
            raise ValueError(f"job {'-'.join(job.key)} is listed before what it needs: {sorted(missing)}")
        listed.add(job.key)


def output_directory(directory: Path, key: JobKey) -> Path:
    return directory / "-".join(key)


def train_job(job: Job, directory: Path, full_phase_cache: Path, reporter: Any) -> None:
    """Train one job's SFT and save it (atomically) where ``output_directory`` says."""
    from sftkit.sft import SparseFineTuning
    from sftkit.training import train_sft

    source = SparseFineTuning.load(output_directory(directory, job.source)) if job.source is not None else None
    sft = train_sft(
        job.config,
        reporter=reporter,
        full_phase_cache=full_phase_cache,
        source=source,
        source_lineage=job.source_lineage,
        **job.data,
    )
    sft.save(output_directory(directory, job.key))


def _with_lineage(job: Job, lineage_of: Callable[[JobKey], dict[str, Any]]) -> Job:
    if job.source is None:
        return job
    return Job(job.key, job.label, job.config, job.data, job.needs, job.source, lineage_of(job.source))


def _forward_events(events: Any, reporters: dict[JobKey, Any]) -> None:
    """Hand the workers' progress events to their jobs' reporters (late ones of a finished job are dropped)."""
    while True:
        try:
            key, method, arguments = events.get_nowait()
        except queue.Empty:
            return
        if key in reporters:
            getattr(reporters[key], method)(*arguments)


# ---------------------------------------------------------------------------------------------- worker side
_events: Any = None  # the worker process's queue to the main process, set when the worker starts


def _start_worker(events: Any) -> None:
    global _events
    import torch

    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation overhead
    _events = events


def _train_in_worker(job: Job, directory: Path, full_phase_cache: Path) -> list[str]:
    recorder = _PhaseRecorder(_QueueReporter(job.key))
    train_job(job, directory, full_phase_cache, recorder)
    return recorder.phases


class _QueueReporter(NullReporter):
    """Sends a job's progress to the main process."""

    def __init__(self, key: JobKey) -> None:
        self.key = key

    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
        _events.put((self.key, "phase_started", (phase, total_steps, done_steps)))

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        _events.put((self.key, "step", (step, loss, lr, tokens)))


class _PhaseRecorder(NullReporter):
    """A trainer reporter that notes the phases run and passes progress on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.phases: list[str] = []

    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
        self.phases.append(phase)
        self.inner.phase_started(phase, total_steps, done_steps)

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.inner.step(step, loss, lr, tokens)
