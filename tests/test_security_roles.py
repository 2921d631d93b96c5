"""Roles (issue 11 items 2, 6, 14): one table from every RPC to the role it needs, enforced by the shared
interceptor for gRPC and by the labeling page for HTTP; credentials per role from env or file; a
non-loopback bind without credentials is refused before anything binds."""

from __future__ import annotations

import http.client
import json

import grpc
import pytest
from kit import env_var, rpc_error, tiny_checkpoint

from chatrl.services.core.feedback_store import FeedbackStore
from chatrl.services.feedback.web import LabelingWeb
from chatrl.services.policy.server import PolicyConfig
from chatrl.services.policy.server import build as build_policy
from chatrl.services.proto.chatrl.v1 import (
    common_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
)
from chatrl.services.reward.server import RewardConfig
from chatrl.services.reward.server import build as build_reward
from chatrl.services.runtime import roles
from chatrl.services.runtime.roles import CredentialError, Credentials
from chatrl.services.runtime.server import ServerConfig, ServiceServer

CODE = grpc.StatusCode
OP, LAB = "operator-secret", "labeler-secret"
OP_ENV, LAB_ENV = "CHATRL_TEST_OPERATOR", "CHATRL_TEST_LABELER"


def _md(token: str | None):
    return [("authorization", f"Bearer {token}")] if token is not None else []


def _cfg(**kw) -> ServerConfig:
    return ServerConfig(port=0, auth_token_env=OP_ENV, labeler_token_env=LAB_ENV, grace_seconds=0, **kw)


def test_every_rpc_of_every_proto_is_in_the_role_table():
    for mod in (policy_pb2, reward_pb2, reference_pb2, trainer_pb2, feedback_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                assert roles.rule(f"/{svc.full_name}/{m.name}") is not None, m.full_name


def test_the_table_gives_each_write_its_role():
    creds = Credentials(operator=OP, labeler=LAB)
    for method in ("chatrl.v1.PolicyInferenceService/UpdateWeights", "chatrl.v1.RewardScoringService/LoadModel",
                   "chatrl.v1.ReferenceModelService/LoadModel", "chatrl.v1.TrainerService/StartRun",
                   "chatrl.v1.TrainerService/CancelRun", "chatrl.v1.FeedbackService/CreateComparisonTasks",
                   "chatrl.v1.FeedbackService/AddPrompts"):
        assert creds.authorize(method, f"Bearer {OP}").role == "operator"
        with pytest.raises(Exception) as e:
            creds.authorize(method, f"Bearer {LAB}")
        assert e.value.code == CODE.PERMISSION_DENIED and "operator" in e.value.message
        with pytest.raises(Exception) as e:
            creds.authorize(method, "")
        assert e.value.code == CODE.UNAUTHENTICATED
    for method in ("NextTask", "SubmitRanking", "SubmitDemonstration"):
        assert creds.authorize(f"chatrl.v1.FeedbackService/{method}", f"Bearer {LAB}").role == "labeler"
        assert creds.authorize(f"chatrl.v1.FeedbackService/{method}", f"Bearer {OP}").role == "operator"
    assert creds.authorize("chatrl.v1.PolicyInferenceService/Generate", "").role == "open"
    with pytest.raises(Exception) as e:  # not classified → refused, whoever asks
        creds.authorize("chatrl.v1.PolicyInferenceService/Unlisted", f"Bearer {OP}")
    assert e.value.code == CODE.PERMISSION_DENIED


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("sec-policy"))
    with env_var(OP_ENV, OP), env_var(LAB_ENV, LAB):
        srv, svc = build_policy(_cfg(), PolicyConfig(checkpoint=str(ckpt), max_new_tokens=4))
    ch = grpc.insecure_channel(srv.address)
    yield policy_pb2_grpc.PolicyInferenceServiceStub(ch)
    ch.close()
    srv.stop(0)
    svc.close()


def _chunk(version: int = 5) -> policy_pb2.UpdateWeightsRequest:
    return policy_pb2.UpdateWeightsRequest(chunk=policy_pb2.WeightsChunk(
        version=version, offset=0, total_bytes=3, sha256="0" * 64, data=b"abc"))


def test_a_labeler_cannot_push_weights_and_no_credential_is_unauthenticated(policy):
    push = lambda tok: policy.UpdateWeights(iter([_chunk()]), metadata=_md(tok), timeout=30)  # noqa: E731
    code, msg = rpc_error(push, LAB)
    assert code == CODE.PERMISSION_DENIED and "operator" in msg
    assert rpc_error(push, None)[0] == CODE.UNAUTHENTICATED
    assert rpc_error(push, "guess")[0] == CODE.UNAUTHENTICATED
    # the operator passes the door; the upload itself is then judged (its hash is wrong)
    code, msg = rpc_error(push, OP)
    assert code == CODE.INVALID_ARGUMENT and "sha256" in msg
    # reads stay open
    req = policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(text="hello there")],
                                     sampling=common_pb2.SamplingParams(max_new_tokens=2, seed=1))
    assert len(policy.Generate(req, timeout=30).results) == 1


def test_a_labeler_cannot_load_a_reward_model(tmp_path):
    with env_var(OP_ENV, OP), env_var(LAB_ENV, LAB):
        srv, svc = build_reward(_cfg(), RewardConfig())
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = reward_pb2_grpc.RewardScoringServiceStub(ch)
            req = reward_pb2.RewardScoringServiceLoadModelRequest(checkpoint_uri=str(tmp_path / "nothing"))
            assert rpc_error(stub.LoadModel, req, metadata=_md(LAB), timeout=30)[0] == CODE.PERMISSION_DENIED
            assert rpc_error(stub.LoadModel, req, metadata=_md(OP), timeout=30)[0] == CODE.NOT_FOUND
    finally:
        srv.stop(0)
        svc.close()


def test_credentials_come_from_files_and_an_empty_one_is_refused(tmp_path):
    op, lab, empty = tmp_path / "op", tmp_path / "lab", tmp_path / "empty"
    op.write_text(OP + "\n")  # a Secret mounted as a file often ends with a newline
    lab.write_text(LAB)
    empty.write_text("\n")
    srv = ServiceServer("x", ServerConfig(port=0, auth_token_env="", auth_token_file=str(op),
                                          labeler_token_env="", labeler_token_file=str(lab)))
    assert srv.creds == Credentials(operator=OP, labeler=LAB)
    with pytest.raises(CredentialError, match="empty"):
        ServiceServer("x", ServerConfig(port=0, auth_token_env="", auth_token_file=str(empty)))
    with pytest.raises(CredentialError, match="cannot read"):
        ServiceServer("x", ServerConfig(port=0, auth_token_env="", auth_token_file=str(tmp_path / "missing")))


# Names a pod would be reached by (Kubernetes Service DNS names). Only the pure check is asked about them:
# nothing in the suite is configured with, binds or dials anything but loopback, and no wildcard or
# non-loopback IP address appears in the tests at all.
EXPOSED = ["chatrl-policy", "chatrl-policy.chatrl.svc.cluster.local"]


@pytest.mark.parametrize("host", EXPOSED)
def test_a_non_loopback_address_needs_a_credential_or_allow_insecure(host):
    with pytest.raises(CredentialError, match="allow_insecure"):
        roles.check_exposure("x", [host], Credentials(), allow_insecure=False)
    roles.check_exposure("x", [host], Credentials(), allow_insecure=True)  # said on purpose: allowed
    roles.check_exposure("x", [host], Credentials(operator=OP), allow_insecure=False)  # a credential: allowed


def test_servers_ask_the_exposure_check_before_binding(monkeypatch):
    """The server and the labeling page consult roles.check_exposure with their bind address in their
    constructors, before any socket exists: a refusal leaves nothing listening."""
    asked = []

    def refuse(service, hosts, creds, allow_insecure):
        asked.append(hosts)
        raise CredentialError("refused")

    monkeypatch.setattr(roles, "check_exposure", refuse)
    with pytest.raises(CredentialError):
        ServiceServer("x", ServerConfig(host="127.0.0.1", port=0, auth_token_env="", labeler_token_env=""))
    with pytest.raises(CredentialError):
        LabelingWeb(FeedbackStore(":memory:"), host="127.0.0.1", port=0)
    assert asked == [["127.0.0.1"], ["127.0.0.1"]]


def test_loopback_needs_no_credential():
    roles.check_exposure("x", ["127.0.0.1"], Credentials(), allow_insecure=False)
    ServiceServer("x", ServerConfig(host="127.0.0.1", port=0, auth_token_env="", labeler_token_env=""))


def test_a_labeler_credential_alone_is_refused():
    with env_var(LAB_ENV, LAB), pytest.raises(CredentialError, match="operator"):
        ServiceServer("x", ServerConfig(port=0, auth_token_env="", labeler_token_env=LAB_ENV))


# -- the feedback service: gRPC and the labeling page ---------------------------------------------------

@pytest.fixture()
def feedback(tmp_path):
    from chatrl.services.feedback.server import FeedbackConfig
    from chatrl.services.feedback.server import build as build_feedback

    with env_var(OP_ENV, OP), env_var(LAB_ENV, LAB):
        srv, svc = build_feedback(_cfg(), FeedbackConfig(db=str(tmp_path / "fb.db"), web_port=0))
    tid = svc.store.create_tasks([{"prompt": "p", "responses": ["a", "b"]}])[0]
    ch = grpc.insecure_channel(srv.address)
    yield feedback_pb2_grpc.FeedbackServiceStub(ch), svc.web.port, tid
    ch.close()
    srv.stop(0)
    svc.close()


def test_labelers_label_and_cannot_create_tasks(feedback):
    stub, _, tid = feedback
    got = stub.NextTask(feedback_pb2.NextTaskRequest(labeler_id="al"), metadata=_md(LAB), timeout=30)
    assert got.task.task_id == tid
    stub.SubmitRanking(feedback_pb2.SubmitRankingRequest(submission_id="s", task_id=tid, labeler_id="al",
                                                         ranking=[1, 0]), metadata=_md(LAB), timeout=30)
    code, _ = rpc_error(stub.AddPrompts, feedback_pb2.AddPromptsRequest(
        prompts=[feedback_pb2.NewPrompt(text="x")]), metadata=_md(LAB), timeout=30)
    assert code == CODE.PERMISSION_DENIED
    assert rpc_error(stub.CreateComparisonTasks, feedback_pb2.CreateComparisonTasksRequest(prompts=["x"], k=2),
                     metadata=_md(LAB), timeout=30)[0] == CODE.PERMISSION_DENIED


def _http(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def test_the_labeling_page_takes_the_labeler_credential_and_checks_browsers(feedback):
    _, port, tid = feedback
    lab = {"Authorization": f"Bearer {LAB}"}
    assert _http(port, "GET", "/api/next?labeler_id=al")[0] == 401
    status, body = _http(port, "GET", "/api/next?labeler_id=al", headers=lab)
    assert status == 200 and body["task"]["task_id"] == tid
    sub = {"submission_id": "w1", "task_id": tid, "labeler_id": "al", "ranking": [0, 1]}
    # a cross-site form post: not JSON → 415; a foreign Origin → 403; a rebinding name for loopback → 403
    assert _http(port, "POST", "/api/rankings", sub, {**lab, "Content-Type": "text/plain"})[0] == 415
    assert _http(port, "POST", "/api/rankings", sub, {**lab, "Origin": "http://evil.example"})[0] == 403
    assert _http(port, "POST", "/api/rankings", sub, {**lab, "Host": f"evil.example:{port}"})[0] == 403
    # a ranking body over SubmitRanking's size limit is refused before it is read
    huge = {**sub, "ranking": list(range(20_000))}
    assert _http(port, "POST", "/api/rankings", huge, lab)[0] == 413
    status, body = _http(port, "POST", "/api/rankings", sub, {**lab, "Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and body["pairs"] == 1


def test_each_rpc_comment_states_the_role_the_table_enforces():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "protos" / "chatrl" / "v1"
    seen = 0
    for proto in ("policy", "reward", "reference", "trainer", "feedback"):
        text = (root / f"{proto}.proto").read_text()
        svc = re.search(r"^service (\w+) \{", text, re.M).group(1)
        for role, rpc in re.findall(r"// Role: (\w+)[^\n]*\n  rpc (\w+)\(", text):
            assert roles.rule(f"chatrl.v1.{svc}/{rpc}").role == role, (svc, rpc)
            seen += 1
    assert seen == sum(1 for m in roles.METHODS if m.startswith("chatrl.v1."))


# -- one credential per labeler (item 15): the credential decides the labeler id --------------------------

ALICE, BOB = "alice-own-secret", "bob-own-secret"


def _labelers_dir(root, **tokens):
    d = root / "labelers"
    d.mkdir()
    for who, tok in tokens.items():
        (d / who).write_text(tok + "\n")
    (d / "..data").mkdir()  # what a mounted Secret volume also holds: skipped
    return d


def test_labeler_credentials_come_from_a_directory_and_are_checked(tmp_path):
    d = _labelers_dir(tmp_path, alice=ALICE, bob=BOB)
    assert roles.load_labelers(str(d), "x") == (("alice", ALICE), ("bob", BOB))
    assert roles.load_labelers("", "x") == ()
    for bad, why in (({"alice": ALICE, "bob": ALICE}, "same token"), ({"al ice": ALICE}, "not a labeler id"),
                     ({"alice": " "}, "empty")):
        root = tmp_path / f"bad{len(why)}"
        root.mkdir()
        with pytest.raises(CredentialError, match=why):
            roles.load_labelers(str(_labelers_dir(root, **bad)), "x")
    with pytest.raises(CredentialError, match="not a directory"):
        roles.load_labelers(str(d / "alice"), "x")
    with pytest.raises(CredentialError, match="differ"):  # a labeler's token must not be the operator's
        Credentials(operator=ALICE, labelers=(("alice", ALICE),))


def test_a_labeler_labels_only_under_their_own_id():
    creds = Credentials(operator=OP, labeler=LAB, labelers=(("alice", ALICE), ("bob", BOB)))
    alice = creds.authorize("chatrl.v1.FeedbackService/SubmitRanking", f"Bearer {ALICE}")
    assert (alice.role, alice.labeler) == ("labeler", "alice")
    assert creds.labeler_id(alice, "") == creds.labeler_id(alice, "alice") == "alice"
    with pytest.raises(Exception) as e:
        creds.labeler_id(alice, "bob")
    assert e.value.code == CODE.PERMISSION_DENIED and e.value.message.startswith("labeler_id")
    # the operator (simulated labelers) and the shared team credential name the labeler themselves …
    for tok in (OP, LAB):
        assert creds.labeler_id(creds.authorize("chatrl.v1.FeedbackService/NextTask", f"Bearer {tok}"), "sim-3") \
            == "sim-3"
    # … but the shared one cannot take the id of a labeler who has a credential of their own
    team = creds.authorize("chatrl.v1.FeedbackService/NextTask", f"Bearer {LAB}")
    with pytest.raises(Exception) as e:
        creds.labeler_id(team, "alice")
    assert e.value.code == CODE.PERMISSION_DENIED and "own" in e.value.message
    assert creds.labeler_id(creds.authorize("chatrl.v1.FeedbackService/NextTask", f"Bearer {OP}"), "alice") == "alice"
    with pytest.raises(Exception) as e:  # a labeler's own credential is still only a labeler's
        creds.authorize("chatrl.v1.FeedbackService/AddPrompts", f"Bearer {ALICE}")
    assert e.value.code == CODE.PERMISSION_DENIED


def test_per_labeler_credentials_through_the_service_and_the_page(tmp_path):
    from chatrl.services.feedback.server import FeedbackConfig
    from chatrl.services.feedback.server import build as build_feedback

    d = _labelers_dir(tmp_path, alice=ALICE, bob=BOB)
    with env_var(OP_ENV, OP):
        srv, svc = build_feedback(ServerConfig(port=0, auth_token_env=OP_ENV, labeler_token_env="",
                                               labelers_dir=str(d), grace_seconds=0),
                                  FeedbackConfig(db=str(tmp_path / "fb.db"), web_port=0))
    t1, t2 = svc.store.create_tasks([{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(2)])
    ch = grpc.insecure_channel(srv.address)
    stub = feedback_pb2_grpc.FeedbackServiceStub(ch)
    try:
        # no labeler id needed: the credential is alice's; naming bob is refused
        assert stub.NextTask(feedback_pb2.NextTaskRequest(), metadata=_md(ALICE), timeout=30).task.task_id == t1
        assert svc.store.get_task(t1)["lease_labeler"] == "alice"
        code, msg = rpc_error(stub.NextTask, feedback_pb2.NextTaskRequest(labeler_id="bob"), metadata=_md(ALICE),
                              timeout=30)
        assert code == CODE.PERMISSION_DENIED and "labeler_id" in msg
        sub = feedback_pb2.SubmitRankingRequest(submission_id="s", task_id=t1, labeler_id="bob", ranking=[1, 0])
        assert rpc_error(stub.SubmitRanking, sub, metadata=_md(ALICE), timeout=30)[0] == CODE.PERMISSION_DENIED
        # bob, under his own name, cannot rank the task alice holds
        code, msg = rpc_error(stub.SubmitRanking, sub, metadata=_md(BOB), timeout=30)
        assert code == CODE.FAILED_PRECONDITION and "lease" in msg
        sub.labeler_id = ""
        stub.SubmitRanking(sub, metadata=_md(ALICE), timeout=30)
        # the page: bob's credential leases under bob whatever the query says; alice's id is refused
        port = svc.web.port
        assert _http(port, "GET", "/api/next?labeler_id=alice", headers={"Authorization": f"Bearer {BOB}"})[0] == 403
        status, body = _http(port, "GET", "/api/next", headers={"Authorization": f"Bearer {BOB}"})
        assert status == 200 and body["task"]["task_id"] == t2
        status, body = _http(port, "POST", "/api/rankings", {"submission_id": "w", "task_id": t2, "ranking": [0, 1]},
                             {"Authorization": f"Bearer {BOB}"})
        assert status == 200, body
        assert [(r["task_id"], r["labeler_id"]) for r in svc.store.export("rankings")] == [(t1, "alice"), (t2, "bob")]
    finally:
        ch.close()
        srv.stop(0)
        svc.close()
