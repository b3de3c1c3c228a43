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


def test_sigint_ends_daemonic_workers_then_raises(sigint_restored):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker = multiprocessing.get_context("spawn").Process(target=_sleep, daemon=True)
    worker.start()
    with pytest.raises(KeyboardInterrupt), workers_ended_first_on_signals(set()):
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.5)  # the handler runs at the next bytecode; do not leave the block before
    assert not worker.is_alive() and worker.exitcode == -signal.SIGTERM
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
