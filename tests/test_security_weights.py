"""UpdateWeights trusts only what it computed (issue 11 items 13, 16): client metadata cannot overwrite the
server's weights_sha256 / checkpoint_uri, the first push's config_json is validated before a model is built
from it, and a rejected upload releases its staging buffer."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from kit import WAIT, rpc_error, tiny_gpt, tiny_tokenizer

from chatrl.clients.lib import PolicyClient, serialize_weights
from chatrl.services.policy.server import PolicyConfig, build
from chatrl.services.runtime.server import ServerConfig

CODE = grpc.StatusCode


@pytest.fixture()
def empty_policy():
    srv, svc = build(ServerConfig(port=0, auth_token_env="", labeler_token_env="", grace_seconds=0),
                     PolicyConfig(max_new_tokens=4))
    c = PolicyClient(srv.address, token="", retries=1, timeout=WAIT)
    yield srv, c
    c.close()
    srv.stop(0)
    svc.close()


def _staging_bytes(srv) -> float:
    return srv.registry.get_sample_value("chatrl_policy_weight_staging_bytes")


def test_metadata_cannot_overwrite_what_the_server_computed(empty_policy):
    srv, c = empty_policy
    tok = tiny_tokenizer()
    model = tiny_gpt(tok.vocab_size)
    meta = {"config_json": json.dumps(model.cfg.to_dict()), "tokenizer_json": tok.to_str(),
            "weights_sha256": "f" * 64, "checkpoint_uri": "/somewhere/else"}
    c.update_weights(model.state_dict(), 1, metadata=meta)
    info = c.model_info()
    assert info.weights_sha256 == hashlib.sha256(serialize_weights(model.state_dict())).hexdigest()
    assert info.checkpoint_uri == "push:1"
    assert _staging_bytes(srv) == 0  # the seeding upload keeps no buffer (a LoRA run pushes adapters next)
    c.update_weights(model.state_dict(), 2)
    assert _staging_bytes(srv) == len(serialize_weights(model.state_dict()))  # kept for the next full push


@pytest.mark.parametrize("change, field", [
    ({"n_head": 0}, "n_head"),
    ({"d_model": 30}, "d_model"),  # not divisible by n_head 4
    ({"n_layer": -1}, "n_layer"),
    ({"d_model": 64}, "shape"),  # a valid config the payload does not fit
])
def test_the_first_push_validates_config_json(empty_policy, change, field):
    srv, c = empty_policy
    tok = tiny_tokenizer()
    model = tiny_gpt(tok.vocab_size, n_head=4)
    cfg = {**model.cfg.to_dict(), **change}
    code, msg = rpc_error(c.update_weights, model.state_dict(), 1, metadata={"config_json": json.dumps(cfg)})
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("chunk.metadata.config_json") and field in msg
    assert _staging_bytes(srv) == 0  # the rejected upload's buffer is released
    assert not c.model_info().loaded
