"""Signals around nnU-Net's worker processes: ours only while a signal is handled, ignored ones stay ignored."""
import multiprocessing
import os
import signal

import pytest

from entrust_nnunet.nnunet.workers import workers_ended_first_on_signals


def _sleep():
    import time
    time.sleep(60)


@pytest.fixture
def sigint_restored():
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_ends_workers_and_their_manager_then_raises(sigint_restored):
    """Both gone by the time the exception unwinds: a Manager still alive then printed half a traceback
    when Ctrl-C came while the main process was receiving a case from it (CI, stop 36)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker = multiprocessing.get_context("spawn").Process(target=_sleep, daemon=True)
    worker.start()
    alive_at_unwind = {}
    with pytest.raises(KeyboardInterrupt), workers_ended_first_on_signals(set()):
        manager = multiprocessing.Manager()  # nnU-Net's iterator starts one (fork, not daemonic) with its workers
        try:
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.5)  # the handler runs at the next bytecode; do not leave the block before
        finally:
            alive_at_unwind = {"worker": worker.is_alive(), "manager": manager._process.is_alive()}
            manager.shutdown()
    assert alive_at_unwind == {"worker": False, "manager": False}
    assert worker.exitcode == -signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ignored_sigint_stays_ignored_and_workers_live(sigint_restored):
    # a background job of a script inherits SIGINT ignored: ending the workers and then ignoring the signal
    # left nnU-Net's iterator with dead workers ("Background workers died", status 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = multiprocessing.get_context("spawn").Process(target=_sleep, daemon=True)
    worker.start()
    try:
        with workers_ended_first_on_signals(set()):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
        assert worker.is_alive()
    finally:
        worker.terminate()
        worker.join()


def test_a_second_sigterm_during_the_cleanup_stays_ignored():
    """raise_on_sigterm ignores SIGTERM once it has raised (the cleanup must not be cut short); leaving the block
    must not put its raising handler back over that."""
    from entrust_nnunet.data.io import Terminated, raise_on_sigterm

    before = raise_on_sigterm()
    try:
        with pytest.raises(Terminated), workers_ended_first_on_signals(set()):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a second SIGTERM now would not interrupt
    finally:
        signal.signal(signal.SIGTERM, before)
