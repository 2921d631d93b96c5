"""Service start-up waits are generous and say what to do when they run out (issue 11, "the suite on a slow
machine"): the timeout comes from $CHATRL_SERVICE_START_TIMEOUT (default 600 s), and running out names the
services still pending, the variable to raise and where their logs are, and stops what was started."""

from __future__ import annotations

import pytest
from kit import env_var, free_port

from chatrl.services.runtime.launcher import START_TIMEOUT_ENV, LocalCluster, start_timeout


def test_the_default_wait_is_generous_and_the_environment_overrides_it():
    with env_var(START_TIMEOUT_ENV, ""):
        assert start_timeout() == 600.0
    with env_var(START_TIMEOUT_ENV, "900"):
        assert start_timeout() == 900.0
    with env_var(START_TIMEOUT_ENV, "soon"), pytest.raises(ValueError, match=START_TIMEOUT_ENV):
        start_timeout()


def test_running_out_of_time_says_what_to_raise_and_stops_the_processes(tmp_path):
    c = LocalCluster(None, [f"feedback.port={free_port()}", f"feedback.db={tmp_path / 'fb.db'}"], only=["feedback"],
                     log_dir=tmp_path / "logs")
    with env_var(START_TIMEOUT_ENV, "0"):  # no process answers health within no time at all
        with pytest.raises(TimeoutError) as e:
            c.start()
    msg = str(e.value)
    assert "feedback (UNAVAILABLE)" in msg and START_TIMEOUT_ENV in msg and str(tmp_path / "logs") in msg
    assert c.procs == {}  # stopped
