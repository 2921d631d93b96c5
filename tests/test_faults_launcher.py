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


RAY_HALF_START = """
import json, psutil, ray, ray._private.services as services
from chatrl.services.trainer.rollout import init_ray
real, calls = services.get_node, []
def get_node(*a, **k):  # the raylet "never registers" on the first start: Ray gives up after GCS + raylet are up
    calls.append(1)
    if len(calls) == 1:
        raise ValueError("simulated: the raylet did not register in time")
    return real(*a, **k)
services.get_node = get_node
init_ray(num_cpus=1)
names = [p.name() for p in psutil.Process().children(recursive=True)]
print(json.dumps({"gcs": names.count("gcs_server"), "raylet": names.count("raylet"),
                  "cpus": ray.cluster_resources().get("CPU")}))
ray.shutdown()
"""


def test_a_ray_start_that_fails_half_way_leaves_nothing_running_beside_the_retry(tmp_path):
    """The first ray.init gets as far as a running GCS and raylet, then fails (as Ray's fixed 30-s raylet
    registration wait does on a loaded machine); the retry runs beside no leftover of it."""
    import json
    import os
    import subprocess
    import sys

    from kit import CHILD_ENV

    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **CHILD_ENV}
    r = subprocess.run([sys.executable, "-c", RAY_HALF_START], capture_output=True, text=True, env=env,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trying once more" in r.stderr and "the failed Ray start left behind" in r.stderr, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"gcs": 1, "raylet": 1, "cpus": 1.0}
