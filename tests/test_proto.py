"""The gRPC contract: generated code is current, every service has its RPCs, tensors round-trip."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "services" / "proto"

# module -> service -> {rpc: (client_streaming, server_streaming)}
EXPECTED = {
    "policy": {
        "PolicyInferenceService": {
            "Generate": (False, False),
            "GenerateStream": (False, True),
            "UpdateWeights": (True, False),
            "GetModelInfo": (False, False),
        }
    },
    "reward": {
        "RewardScoringService": {
            "Score": (False, False),
            "LoadModel": (False, False),
            "GetModelInfo": (False, False),
        }
    },
    "reference": {
        "ReferenceModelService": {
            "LogProbs": (False, False),
            "LoadModel": (False, False),
            "GetModelInfo": (False, False),
        }
    },
    "trainer": {
        "TrainerService": {
            "StartRun": (False, False),
            "GetRun": (False, False),
            "ListRuns": (False, False),
            "WatchRun": (False, True),
            "CancelRun": (False, False),
            "ListCheckpoints": (False, False),
        }
    },
    "feedback": {
        "FeedbackService": {
            "AddPrompts": (False, False),
            "CreateComparisonTasks": (False, False),
            "NextTask": (False, False),
            "SubmitRanking": (False, False),
            "SubmitDemonstration": (False, False),
            "SkipTask": (False, False),
            "Export": (False, True),
            "GetStats": (False, False),
        }
    },
}


def _load_gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_current(tmp_path):
    _load_gen_proto().generate(tmp_path / "out")
    fresh, committed = _tree(tmp_path / "out"), _tree(GENERATED)
    # hand-written modules beside the generated code (the enum maps, the wire codecs) are not generated
    committed = {k: v for k, v in committed.items() if "/" in k or k == "__init__.py"}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is out of date (run `make proto`): {stale}"


def test_generated_imports_are_rewritten():
    for path in GENERATED.rglob("*.py*"):
        if path.suffix in (".py", ".pyi"):
            text = path.read_text()
            assert "from chatrl.v1 import" not in text and "import chatrl.v1" not in text, path


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_service_modules_have_rpcs(module):
    pb2 = importlib.import_module(f"chatrl.services.proto.chatrl.v1.{module}_pb2")
    pb2_grpc = importlib.import_module(f"chatrl.services.proto.chatrl.v1.{module}_pb2_grpc")
    for service, rpcs in EXPECTED[module].items():
        desc = pb2.DESCRIPTOR.services_by_name[service]
        got = {m.name: (m.client_streaming, m.server_streaming) for m in desc.methods}
        assert got == rpcs
        assert hasattr(pb2_grpc, f"{service}Stub")
        assert hasattr(pb2_grpc, f"add_{service}Servicer_to_server")
        servicer = getattr(pb2_grpc, f"{service}Servicer")
        for rpc in rpcs:
            assert callable(getattr(servicer, rpc))


def test_tensor_round_trip():
    from chatrl.services.proto.chatrl.v1 import common_pb2

    arr = np.arange(6, dtype="<f4").reshape(2, 3) / 7
    t = common_pb2.Tensor(data=arr.tobytes(), dtype=common_pb2.DTYPE_FLOAT32, shape=arr.shape)
    back = common_pb2.Tensor.FromString(t.SerializeToString())
    out = np.frombuffer(back.data, dtype="<f4").reshape(tuple(back.shape))
    assert back.dtype == common_pb2.DTYPE_FLOAT32
    np.testing.assert_array_equal(out, arr)


def test_optional_sampling_fields_have_presence():
    from chatrl.services.proto.chatrl.v1 import common_pb2

    sp = common_pb2.SamplingParams()
    assert not sp.HasField("temperature") and not sp.HasField("seed")
    sp.temperature = 0.0  # explicit greedy is distinguishable from "unset" (= 1.0)
    assert sp.HasField("temperature")
