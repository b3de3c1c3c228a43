"""Worker processes under Ctrl-C and SIGTERM: one line from the main process, no tracebacks from workers.

nnU-Net's predictor preprocesses in daemonic worker processes that share Manager objects; our export
runs in a spawn pool. Ctrl-C reaches the whole process group, so every worker would print its own
KeyboardInterrupt traceback unless SIGINT is blocked in them and the main process ends them in order.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading

from entrust_nnunet.data.io import sigterm_handler_of_this_process


@contextlib.contextmanager
def sigint_blocked_in_children():
    """Processes started inside inherit a blocked SIGINT. Ctrl-C reaches the whole process group; this
    way only the main process sees it (one line, exit 130) and tears its workers down, instead of every
    worker printing a KeyboardInterrupt traceback. A Ctrl-C meanwhile waits until the block ends."""
    from multiprocessing import resource_tracker

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    resource_tracker.ensure_running()  # starting it unblocks SIGINT in this thread: start it before blocking
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def end_processes(processes) -> None:
    # daemonic workers first: a Manager ended before them would make them print EOFError tracebacks
    for group in ([p for p in processes if p.daemon], [p for p in processes if not p.daemon]):
        for p in group:
            p.terminate()
        for p in group:
            p.join(10)


@contextlib.contextmanager
def workers_ended_first_on_signals(ours: set):
    """On Ctrl-C/SIGTERM, end the processes started inside (nnU-Net's preprocessing workers, then their
    Manager) before the exception unwinds nnU-Net's iterator: unwinding releases the Manager objects the
    workers use, and a signal in the middle of receiving a case closes the connection the Manager is
    handing the tensor over on; either way a live process would print a traceback. Then the previous
    handler raises as usual. A signal this process inherited as
    ignored (``nohup``, a background job of a script) stays ignored: ending the workers and then ignoring the
    signal would leave nnU-Net's iterator with dead workers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not signal.SIG_IGN}

    @sigterm_handler_of_this_process
    def handler(signum, frame):
        end_processes(set(multiprocessing.active_children()) - ours)
        if callable(previous[signum]):
            previous[signum](signum, frame)
        else:  # default or ignored: let the signal do what it did before
            signal.signal(signum, previous[signum])
            os.kill(os.getpid(), signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            # only where ours is still installed: the previous handler may have replaced itself while handling a
            # signal (raise_on_sigterm ignores a second SIGTERM during the cleanup that follows)
            if signal.getsignal(s) is handler:
                signal.signal(s, h)


def workers_started(iterator):
    """nnU-Net's preprocessing iterator starts its worker processes at the first ``next()``."""
    with sigint_blocked_in_children():
        first = next(iterator, None)
    if first is not None:
        yield first
        yield from iterator
