"""`terminated_by_signal` (the dev stack's and the demo's SIGTERM handling) ends its block with
128 + signal, also when the handler's SystemExit is lost in a finalizer."""

from __future__ import annotations

import os
import signal

import pytest

from shelfsight.shared.dev.stack import terminated_by_signal


def test_sigterm_inside_the_block_exits_with_143_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    ran_on = False
    with pytest.raises(SystemExit) as exited, terminated_by_signal():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs at the next bytecode boundaries
            pass
        ran_on = True
    assert exited.value.code == 143 and not ran_on
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_exit_a_finalizer_swallowed_still_ends_the_block_with_143() -> None:
    """The flaky demo test: SIGTERM landed while the main thread ran a `__del__`, Python printed
    "Exception ignored" and the demo ran to the end, exiting 0 with its stack stopped."""

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here: its SystemExit cannot leave __del__
                pass

    ran_on = False
    with pytest.raises(SystemExit) as exited, terminated_by_signal():
        Finalized()  # collected at once
        ran_on = True
    assert ran_on  # the block went on: what lost the exit before
    assert exited.value.code == 143
