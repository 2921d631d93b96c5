"""The CLI against real processes: `chatrl up` starts all five services, `status`, `generate` and
`chat` talk to them, Ctrl-C stops everything cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from chatrl.services.runtime.launcher import free_ports


def chatrl(*args, **kw):
    return subprocess.run([sys.executable, "-m", "chatrl.clients.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_up_status_generate_chat_and_clean_stop(micro_run, tmp_path):
    _, cks = micro_run
    names = ["policy", "reward", "reference", "trainer", "feedback"]
    cfg = {"common": {"host": "127.0.0.1", "auth_token_env": "CHATRL_TEST_NO_TOKEN"}}
    for n, port in zip(names, free_ports(len(names))):
        cfg[n] = {"port": port, "metrics_port": -1}
    cfg["policy"]["checkpoint"] = str(cks["sft"])
    cfg["reference"]["checkpoint"] = str(cks["sft"])
    cfg["reward"]["checkpoint"] = str(cks["reward"])
    cfg["trainer"]["runs_dir"] = str(tmp_path / "runs")
    cfg["feedback"]["db"] = str(tmp_path / "fb.db")
    cfg["feedback"]["policy_address"] = f"127.0.0.1:{cfg['policy']['port']}"
    svc = tmp_path / "services.yaml"
    svc.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen([sys.executable, "-m", "chatrl.clients.cli", "up", "--services", str(svc)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
            assert up.poll() is None, "".join(lines)
        assert sum("SERVING" in ln for ln in lines) == 5, "".join(lines)
        st = chatrl("status", "--services", str(svc))
        assert st.returncode == 0, st.stdout + st.stderr
        assert st.stdout.count("SERVING") == 5 and "model v1" in st.stdout
        gen = chatrl("generate", "How was the film?", "-n", "2", "--seed", "3", "--max-new-tokens", "8",
                     "--services", str(svc))
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.count("- ") == 2 and "model v1" in gen.stdout
        chat = chatrl("chat", "--services", str(svc), "--max-new-tokens", "8",
                      input="How was the film?\nAnd the cast?\n\n")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.count("bot> ") == 2 and "chatting with" in chat.stdout
        bad = chatrl("generate", "x", "--max-new-tokens", "100000", "--services", str(svc))
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "max_new_tokens" in bad.stderr
    finally:
        up.send_signal(signal.SIGINT)
        try:
            out, _ = up.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
            out, _ = up.communicate()
            pytest.fail(f"chatrl up did not stop on Ctrl-C:\n{''.join(lines)}{out}")
    assert up.returncode == 0, out
    assert "stopped:" in out and "policy (0)" in out and "feedback (0)" in out
    st = chatrl("status", "--services", str(svc))
    assert st.returncode == 1 and st.stdout.count("UNAVAILABLE") == 5


def test_serve_reports_config_errors():
    r = chatrl("serve", "reward", "--set", "bogus=1")
    assert r.returncode == 2 and "reward.bogus" in r.stdout + r.stderr
