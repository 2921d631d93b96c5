"""A real Prometheus (Debian package) on loopback scrapes the five chatrl services during a micro run,
with the alert and recording rules loaded; then every PromQL expression of the Grafana dashboard and of
the rules is evaluated through the HTTP API: none may error, and each must return data where data is
expected.

The services run in-process (their ``build()`` with ``metrics_port=0``) on 127.0.0.1. Traffic: the
feedback service samples comparison tasks from policy-inference and takes a ranking and a
demonstration; a few deliberate client errors, one RESOURCE_EXHAUSTED and one rejected weight update;
and two runs through the trainer's StartRun — a short pre-training run, and a micro STAGE_PPO run, the
real trainer's, told (pipeline.start_services false + service_overrides) to use the in-process services:
it seeds them with the SFT weights and the reward model, its Ray rollout workers call policy Generate,
reference LogProbs and reward Score over gRPC, and it pushes its weights to policy-inference with
UpdateWeights after every iteration.

Alert expressions describe trouble, so on a healthy run they rightly return nothing: for each alert the
test instead requires that its *signal* sub-expressions (the series it watches, SIGNALS below) return
data — and that the whole expression evaluates without error. Every dashboard query and every
recording rule must return data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from kit import free_port, micro_yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "k8s" / "monitoring" / "chatrl-rules.yaml"
DASHBOARD = REPO / "k8s" / "monitoring" / "grafana-dashboard.json"
TOKEN_ENV = "CHATRL_PROM_TEST_TOKEN"
JOBS = ("policy-inference", "reward-scoring", "reference-model", "trainer", "feedback")

# Grafana's variables, as a user with "All" selected sees them
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "15s", "$job": ".*", "$run_id": ".*",
                "$stage": ".*"}

# alert → the sub-expressions (verbatim from its expr) that must return data in this run
SIGNALS = {
    "ChatrlServiceDown": ['up{job=~"policy-inference|reward-scoring|reference-model|trainer|feedback"}'],
    "ChatrlServiceNotServing": ['{__name__=~"chatrl_[a-z]+_up"}'],
    "ChatrlHighErrorRate": ["chatrl:rpc_errors:ratio_rate5m"],
    "ChatrlRequestsRejected": [
        'sum by (job) (rate({__name__=~"chatrl_[a-z]+_rpc_requests_total", code="RESOURCE_EXHAUSTED"}[5m]))'],
    "ChatrlQueueSaturated": ["chatrl_policy_queue_depth", "chatrl_reward_queue_depth", "chatrl_reference_queue_depth"],
    "ChatrlWeightUpdateRejected": ['increase(chatrl_policy_weight_updates_total{outcome="rejected"}[15m])'],
    "ChatrlTrainingRunFailed": ['delta(chatrl_trainer_runs{state="FAILED"}[10m])'],
    "ChatrlKLAboveTarget": [
        'min by (run_id, stage) (min_over_time(chatrl_trainer_metric{name="kl", stage=~"ppo.*"}[15m]))',
        "chatrl:ppo_kl_target",
        'max by (run_id, stage) (changes(chatrl_trainer_metric{name="policy_version", stage=~"ppo.*"}[15m]))'],
    "ChatrlLogprobGate": ['chatrl_trainer_metric{name="logprob_gate_max", stage=~"ppo.*"}',
                          'chatrl_trainer_metric{name="logprob_gate_threshold", stage=~"ppo.*"}'],
    "ChatrlEntropyCollapse": [
        'chatrl_trainer_metric{name="entropy", stage=~"ppo.*"}',
        '0.25 * max_over_time(chatrl_trainer_metric{name="entropy", stage=~"ppo.*"}[2h])'],
    "ChatrlRewardHacking": [
        'deriv(chatrl_trainer_metric{name="reward", stage=~"ppo.*"}[30m])',
        'deriv(chatrl_trainer_metric{name="gold_train", stage=~"ppo.*"}[30m])'],
    "ChatrlLabelingStalled": ["max by (job) (chatrl_feedback_open_tasks)", "max by (job) (chatrl_feedback_active_labelers)",
                              "sum(chatrl_trainer_awaiting_rankings)"],
}
# alerts this run must fire, because the test provokes them on purpose
FIRING_HERE = {"ChatrlWeightUpdateRejected": "a stale UpdateWeights push is rejected",
               "ChatrlRequestsRejected": "one Generate asks for more samples than max_request_samples"}
# dashboard queries allowed to return nothing here, with the reason
ALLOWED_EMPTY_PANELS: dict[str, str] = {
    f'chatrl_trainer_metric{{run_id=~"$run_id", stage=~"$stage", name="label_to_policy_s_{q}"}}':
        "this run's PPO is STAGE_PPO from given checkpoints: no rankings of its own to time (the pipeline "
        "test checks the figure)" for q in ("median", "max")}

POSITIVE = ["The film was warm and funny.", "This movie is a delight.", "The cast felt honest and moving.",
            "The story is wonderful.", "The music was charming.", "A lovely, kind and funny film."]
NEGATIVE = ["The film was dull.", "This movie is a mess.", "The story felt long and empty.",
            "The script is tedious.", "The ending was clumsy.", "A cold, boring and clumsy film."]


# ------------------------------------------------------------------------------------------ helpers
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _get(url: str, timeout: float = 10.0) -> dict:
    with _OPENER.open(url, timeout=timeout) as r:
        return json.loads(r.read())


def _wait(what: str, fn, timeout: float = 60.0, interval: float = 0.2):
    """Poll fn() until it returns a truthy value; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (OSError, ValueError) as e:  # not up yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _norm(expr: str) -> str:
    return re.sub(r"\s+", " ", expr).strip()


def _prometheus_binary() -> str | None:
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        subprocess.run(["bash", str(REPO / "k8s" / "ensure-prometheus.sh")], capture_output=True, timeout=600)
    return shutil.which("prometheus")


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> dict:
        """/api/v1/query at now; returns {"status", "data"|"error"} (an HTTP 4xx/5xx body included)."""
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return _get(url)
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}") or {"status": "error", "error": str(e)}

    def result(self, expr: str) -> list:
        r = self.query(expr)
        assert r.get("status") == "success", f"{expr!r} failed: {r.get('errorType')}: {r.get('error')}"
        res = r["data"]["result"]
        return res if isinstance(res, list) else [res]  # scalar/string results are one value

    def has_data(self, expr: str) -> bool:
        return bool(self.result(expr))


# ------------------------------------------------------------------------------------------ fixture
@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    path = _prometheus_binary()
    if path is None:
        pytest.skip("prometheus is not installed and k8s/ensure-prometheus.sh could not install it "
                    "(Debian package prometheus)")
    return path


@pytest.fixture()
def stack(micro_run, tiny_data, tmp_path, monkeypatch, prometheus_bin, ray_session):
    """The five services in-process with /metrics on, and Prometheus scraping them every second."""
    from chatrl.services.feedback.server import FeedbackConfig
    from chatrl.services.feedback.server import build as build_feedback
    from chatrl.services.policy.server import PolicyConfig
    from chatrl.services.policy.server import build as build_policy
    from chatrl.services.reference.server import ReferenceConfig
    from chatrl.services.reference.server import build as build_reference
    from chatrl.services.reward.server import RewardConfig
    from chatrl.services.reward.server import build as build_reward
    from chatrl.services.runtime.server import ServerConfig
    from chatrl.services.trainer import server as trainer_server

    monkeypatch.setenv(TOKEN_ENV, "tok")
    _, cks = micro_run

    def scfg() -> ServerConfig:
        return ServerConfig(port=0, metrics_port=0, auth_token_env=TOKEN_ENV, grace_seconds=1, max_workers=8)

    started = []
    try:
        policy = build_policy(scfg(), PolicyConfig(checkpoint=str(cks["sft"]), threads=1, max_request_samples=64))
        started.append(policy)
        reward = build_reward(scfg(), RewardConfig(checkpoint=str(cks["reward"]), threads=1))
        started.append(reward)
        reference = build_reference(scfg(), ReferenceConfig(checkpoint=str(cks["sft"]), threads=1))
        started.append(reference)
        feedback = build_feedback(scfg(), FeedbackConfig(db=str(tmp_path / "feedback.db"),
                                                         policy_address=policy[0].address))
        started.append(feedback)
        trainer = trainer_server.build(scfg(), trainer_server.TrainerConfig(  # runs read the test's temporary files
            runs_dir=str(tmp_path / "runs"), threads=1,
            data_roots=[tempfile.gettempdir(), *trainer_server.TrainerConfig().data_roots]))
        started.append(trainer)
        servers = dict(zip(JOBS, (policy, reward, reference, trainer, feedback)))

        port = free_port()
        cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
               "rule_files": [str(RULES)],
               "scrape_configs": [{"job_name": job, "static_configs": [
                   {"targets": [f"127.0.0.1:{srv.metrics_port}"]}]} for job, (srv, _) in servers.items()]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        log = open(tmp_path / "prometheus.log", "wb")
        proc = subprocess.Popen([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        try:
            prom = Prom(port)
            _wait("Prometheus ready", lambda: proc.poll() is None and
                  _OPENER.open(f"{prom.base}/-/ready", timeout=2).status == 200, timeout=60)

            def all_up():
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                t = _get(f"{prom.base}/api/v1/targets")["data"]["activeTargets"]
                return len(t) == len(JOBS) and all(x["health"] == "up" for x in t)

            _wait("every chatrl target scraped and up", all_up, timeout=60)
            yield prom, servers
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    finally:
        for srv, svc in reversed(started):
            srv.stop(0)
            close = getattr(svc, "close", None)
            if close:
                close()


def _drive_traffic(servers, tiny_data, cks, gold) -> int:
    """RPCs on every service (successes, client errors, a rejection), two trainer runs. Returns the
    number of accepted weight updates."""
    from chatrl.clients.lib import FeedbackClient, PolicyClient, RewardClient, TrainerClient
    from chatrl.services.proto.chatrl.v1 import trainer_pb2

    addr = {job: srv.address for job, (srv, _) in servers.items()}
    with FeedbackClient(addr["feedback"], token="tok", timeout=60) as fb:
        fb.add_prompts(["How was the film?", "Tell me about the story."])
        tasks = fb.create_comparison_tasks(["What did you think of the movie?", "Did you like the cast?"], 2,
                                           max_new_tokens=8, seed=1)
        assert len(tasks.task_ids) == 2
        t = fb.next_task("labeler-1")
        fb.submit_ranking("labeler-1/1", t.task.task_id, "labeler-1", [1, 0])
        fb.submit_demonstration("labeler-1/d1", "labeler-1", [{"role": "user", "content": "Hi?"},
                                                              {"role": "assistant", "content": "Hello."}])
        with pytest.raises(grpc.RpcError):
            fb.create_comparison_tasks(["x"], 1)  # k < 2: INVALID_ARGUMENT
    with PolicyClient(addr["policy-inference"], token="tok", timeout=60) as pol:
        pol.generate(["How was the film?"], n=2, max_new_tokens=6, seed=3)
        list(pol.generate_stream("Tell me about the story.", max_new_tokens=6, seed=4))
        with pytest.raises(grpc.RpcError):
            pol.generate([], max_new_tokens=4)  # INVALID_ARGUMENT
    with RewardClient(addr["reward-scoring"], token="tok", timeout=60) as rw:
        rw.score(["How was the film?"], ["It was warm and funny."])
    services_yaml = tiny_data["dir"] / "prometheus_services.yaml"  # under the trainer's data root
    services_yaml.write_text(yaml.safe_dump({n: {"auth_token_env": TOKEN_ENV}
                                             for n in ("policy", "reward", "reference", "feedback")}))
    with TrainerClient(addr["trainer"], token="tok", timeout=60) as tr:
        tr.start_run("pretrain", micro_yaml(tiny_data), overrides={"pretrain.steps": "6", "pretrain.log_every": "2"},
                     run_id="prom-pretrain")
        # STAGE_PPO's inputs: the SFT and reward-model checkpoints, and the running services (their token
        # is in TOKEN_ENV); the SFT weights are pushed first (version 2), then one push per iteration
        ppo_over = {"ppo.iterations": "4", "ppo.prompts_per_iteration": "4", "ppo.samples_per_prompt": "2",
                    "ppo.max_new_tokens": "8", "ppo.epochs": "1", "ppo.minibatch_size": "8", "ppo.ckpt_every": "10",
                    "ppo.num_workers": "1", "dtype": "fp32", "threads": "1",
                    "ppo.policy_init": str(cks["sft"]), "ppo.reward_model": str(cks["reward"]),
                    "data.gold_file": str(gold), "pipeline.start_services": "false",
                    # the services' credentials are the operator's: named in a services file under a data
                    # root, never in the run's own overrides (which may only say where the services are)
                    "pipeline.services": str(services_yaml),
                    "pipeline.service_overrides": yaml.safe_dump(
                        [f"{n}.{k}" for n, job in (("policy", "policy-inference"), ("reward", "reward-scoring"),
                                                   ("reference", "reference-model"), ("feedback", "feedback"))
                         for k in (f"host={addr[job].rpartition(':')[0]}", f"port={addr[job].rpartition(':')[2]}")],
                        default_flow_style=True).strip()}
        for run_id, stage, over in (("prom-pretrain", None, None), ("prom-ppo", "ppo", ppo_over)):
            if stage:
                tr.start_run(stage, micro_yaml(tiny_data), overrides=over, run_id=run_id)
            events = list(tr.watch_run(run_id, timeout=300))
            final = [e.state_change.new_state for e in events if e.WhichOneof("payload") == "state_change"]
            assert final and final[-1] == trainer_pb2.RUN_STATE_SUCCEEDED, \
                [e.log_line for e in events if e.log_line][-5:]
    # a stale push: policy-inference rejects it (the ChatrlWeightUpdateRejected signal); and a rejection,
    # last, so that the alert on new rejection series sees it within its 5-minute window on a slow machine
    with PolicyClient(addr["policy-inference"], token="tok", timeout=60) as pol:
        with pytest.raises(grpc.RpcError) as e:
            pol.generate(["a", "b"], n=64, max_new_tokens=4)  # 128 samples > max_request_samples 64
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as e:
            pol.update_weights_bytes(b"x" * 8, version=1)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return 5  # the SFT weights StartRun(PPO) seeds + one per PPO iteration


def _alert_and_record_rules() -> tuple[list[dict], list[dict]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return [r for r in rules if "alert" in r], [r for r in rules if "record" in r]


def _dashboard() -> tuple[list[tuple[str, str]], list[str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend((p.get("title", ""), t["expr"]) for t in p.get("targets") or [] if t.get("expr"))
            walk(p.get("panels") or [])

    walk(dash["panels"])
    variables = [v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
                 for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs, variables


def _grafana(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def test_signals_are_verbatim_parts_of_their_alerts():
    alerts, _ = _alert_and_record_rules()
    assert set(SIGNALS) == {a["alert"] for a in alerts}, "every alert needs its signals listed here"
    for a in alerts:
        for s in SIGNALS[a["alert"]]:
            assert _norm(s) in _norm(a["expr"]), f"{a['alert']}: {s!r} is not part of its expr"


@pytest.mark.slow
def test_dashboard_and_alert_queries_against_a_real_prometheus(stack, tiny_data, micro_run, tiny_gold):
    prom, servers = stack
    pushes = _drive_traffic(servers, tiny_data, micro_run[1], tiny_gold)

    # Prometheus has scraped the end state: every accepted push and the rejected one, the PPO metrics,
    # and the rules have been evaluated on them
    _wait("the final weight updates scraped", lambda: prom.result(
        f'chatrl_policy_weight_updates_total{{outcome="ok"}} >= {pushes}') and prom.result(
        'chatrl_policy_weight_updates_total{outcome="rejected"} >= 1'), timeout=30)
    _wait("PPO metrics scraped", lambda: prom.result(
        'chatrl_trainer_metric{run_id="prom-ppo", stage="ppo_r0", name="policy_version"} == 6'), timeout=30)
    # rate()/increase()/deriv() need two samples of a series: wait until every chatrl series has three
    names = sorted({r["metric"]["__name__"] for r in prom.result('group by (__name__) ({__name__=~"chatrl_.+"})')})
    assert len(names) > 30, names
    _wait("three samples of every chatrl series", lambda: all(
        prom.result(f"min(count_over_time({n}[10m])) >= 3") for n in names), timeout=30, interval=0.5)
    _wait("the rules evaluated on the PPO metrics", lambda: prom.result("chatrl:ppo_kl_target"), timeout=30)

    problems = []
    alerts, records = _alert_and_record_rules()
    for r in records:
        try:
            if not prom.has_data(r["expr"]):
                problems.append(f"recording rule {r['record']}: expr returned no data")
            if not prom.has_data(r["record"]):
                problems.append(f"recording rule {r['record']}: no recorded series")
        except AssertionError as e:
            problems.append(f"recording rule {r['record']}: {e}")
    for a in alerts:
        try:
            firing = prom.result(a["expr"])  # may be empty (healthy), must not error
            if a["alert"] in FIRING_HERE and not firing:
                problems.append(f"alert {a['alert']} does not fire although {FIRING_HERE[a['alert']]}")
            for s in SIGNALS[a["alert"]]:
                if not prom.has_data(s):
                    problems.append(f"alert {a['alert']}: signal {s!r} returned no data")
        except AssertionError as e:
            problems.append(f"alert {a['alert']}: {e}")
    exprs, variables = _dashboard()
    assert len(exprs) >= 30
    for title, expr in exprs:
        try:
            if not prom.has_data(_grafana(expr)) and expr not in ALLOWED_EMPTY_PANELS:
                problems.append(f"dashboard panel {title!r}: {expr!r} returned no data")
        except AssertionError as e:
            problems.append(f"dashboard panel {title!r}: {e}")
    for q in variables:  # Grafana's label_values(selector, label): the selector has series with that label
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
        assert m, f"unexpected variable query {q!r}"
        series = prom.result(_grafana(m.group(1)))
        if not any(m.group(2) in s["metric"] for s in series):
            problems.append(f"dashboard variable {q!r}: no series with label {m.group(2)}")
    # the rule groups as Prometheus itself evaluates them: loaded, and no evaluation errors
    groups = _get(f"{prom.base}/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    for r in alerts + records:
        name = r.get("alert") or r.get("record")
        if name not in loaded:
            problems.append(f"rule {name} not loaded by Prometheus")
        elif loaded[name]["health"] != "ok":
            problems.append(f"rule {name}: {loaded[name]['health']} {loaded[name].get('lastError')}")
    assert not problems, "\n".join(problems)

    # and the data is the run's: the SFT push (version 2) + 4 PPO iterations → version 6; RM reward and gold
    kl = prom.result('chatrl_trainer_metric{run_id="prom-ppo", name="kl"}')
    assert len(kl) == 1 and kl[0]["metric"]["stage"] == "ppo_r0"
    assert prom.result('chatrl_policy_model_version == 6')
    assert prom.result('sum(chatrl_policy_rpc_requests_total{method="UpdateWeights", code="OK"}) == 5')
    assert prom.result('chatrl_trainer_metric{run_id="prom-ppo", name="gold_train"}')
