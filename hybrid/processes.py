"""The processes a command starts (the workers of a study, the studies of `compare` and `reproduce`): each ends
with the command, whichever signal stops it. A child stops cleanly (SIGTERM) once its parent is gone, SIGKILL
included; a parent stopped by SIGINT or SIGTERM passes SIGTERM on to its children and waits for them."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

PARENT_POLL_SECONDS = 1.0  # how often a child checks that the process that started it is alive


def stop_with(parent: int) -> None:
    """Stop this process cleanly (SIGTERM) once `parent` (the process that started it) is gone, killed included."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`timeout`, a scheduler, `kill`) raises KeyboardInterrupt here, as Ctrl-C does."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_each(target: Callable[..., None], jobs: list[tuple[Any, ...]], slots: int) -> list[int | None]:
    """target(*job, slot, parent_pid) for every job, each in a spawned process of its own, `slots` at a time (slot:
    0..slots-1, free while the process runs); their exit codes in job order. Ctrl-C or SIGTERM: the processes
    running get SIGTERM, are waited for, and KeyboardInterrupt is raised; no job starts after that."""
    ctx = multiprocessing.get_context("spawn")
    codes: list[int | None] = [None] * len(jobs)
    running: dict[BaseProcess, tuple[int, int]] = {}  # process -> (job index, slot)
    pending = list(enumerate(jobs))
    try:
        with terminate_as_interrupt():
            while pending or running:
                free = sorted(set(range(slots)) - {slot for _, slot in running.values()})
                while pending and free:
                    index, job = pending.pop(0)
                    slot = free.pop(0)
                    process = ctx.Process(target=target, args=(*job, slot, os.getpid()))
                    process.start()
                    running[process] = (index, slot)
                wait([p.sentinel for p in running])
                for process in [p for p in running if not p.is_alive()]:
                    process.join()
                    codes[running.pop(process)[0]] = process.exitcode
    except KeyboardInterrupt:
        for process in running:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in running:
            process.join()
        raise
    return codes
