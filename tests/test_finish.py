"""The final test's claim (hpsearch.finish): of processes finishing at once one tests; a stop leaves no claim."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest

from hpsearch.finish import _finish_claim
from hpsearch.record import FINISH_KEY
from hpsearch.signals import interrupt, on_stop_signals
from hpsearch.storage import claims


def _ctrl_c_once_claimed(where: str) -> Any:
    """Return a profile hook that sends SIGINT to the main thread once the claim is stored: as ``claim``
    returns True (``where="claim"``), or as the finish next looks for a record (``where="_recorded"``)."""
    stored = False

    def hook(frame: Any, event: str, value: Any) -> None:
        nonlocal stored
        name = frame.f_code.co_name
        stored = stored or (event == "return" and name == "claim" and value is True)
        if stored and (where == "claim" or (event == "call" and name == where)):
            sys.setprofile(None)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    return hook


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")


# CI saw this: a Ctrl-C just after the claim was stored (while the finish looked once more for a
# record another process might have written) left the claim behind, and the next finish waited
# a minute for it to go stale.
@pytest.mark.parametrize("where", ["claim", "_recorded"])
def test_a_stop_signal_right_after_the_claim_leaves_no_claim(study: optuna.Study, where: str) -> None:
    with pytest.raises(KeyboardInterrupt), on_stop_signals(interrupt):
        sys.setprofile(_ctrl_c_once_claimed(where))
        try:
            with _finish_claim(study, 0):
                pytest.fail("the signal should have stopped the finish before its test began")
        finally:
            sys.setprofile(None)
    assert not claims(study, FINISH_KEY)


def test_the_claim_is_held_during_the_test_and_released_after(study: optuna.Study) -> None:
    with _finish_claim(study, 0) as done:
        assert done is None and list(claims(study, FINISH_KEY)) == [f"{FINISH_KEY}0"]
    assert not claims(study, FINISH_KEY)
