"""3. Weight sync: ``UpdateWeights`` (client serialises the state dict to safetensors bytes, sha256, 1 MiB
chunks over gRPC; the server checks, parses and stages a new model) of the default model and of a ~100M
parameter model, vs an in-memory copy of the same state dict into a model of the same shape
(``load_state_dict``) and vs safetensors written to local disk and read back into a model. MB/s of
fp32 weights (the same byte count for all three)."""

from __future__ import annotations

import json
import os
import time

from bench.common import (
    Row,
    ServiceProc,
    Size,
    Workdir,
    compare,
    gpt_config,
    interleave,
    log,
    random_gpt,
    torch_threads,
)

NAME = "weight_sync"


def untied(state: dict) -> dict:
    """safetensors refuses shared storage (tied embeddings): copy the second name of a shared tensor."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def run(size: Size, wd: Workdir) -> list[Row]:
    rows: list[Row] = []
    for spec in size.sync_models:
        rows += _one_model(size, wd, *spec)
    return rows


def _one_model(size: Size, wd: Workdir, label: str, d: int, n_layer: int, n_head: int, vocab: int) -> list[Row]:
    from safetensors.torch import load_file, save_file

    from chatrl.clients.lib import PolicyClient

    cfg = gpt_config(size, d_model=d, n_layer=n_layer, n_head=n_head, vocab_size=vocab)
    src = random_gpt(cfg, 1)
    dst = random_gpt(cfg, 2)
    state = src.state_dict()
    nbytes = sum(v.numel() * v.element_size() for v in untied(state).values())
    mb = nbytes / 1e6
    path = wd.path / f"weights-{d}x{n_layer}.safetensors"
    log(f"weight sync: {label} ({src.num_params() / 1e6:.1f}M params, {mb:.1f} MB)")
    with ServiceProc("policy", wd.path / "logs", threads=1, max_weights_mb=max(64, int(mb * 2))) as svc, \
            torch_threads(1):
        svc.wait(serving=False)
        client = PolicyClient(svc.address, timeout=600)
        client.update_weights(random_gpt(cfg, 3).state_dict(), 1, metadata={"config_json": json.dumps(cfg.to_dict())})
        svc.wait(serving=True)
        version = [1]

        def push() -> float:
            version[0] += 1
            t = time.perf_counter()
            res = client.update_weights(state, version[0])
            dt = time.perf_counter() - t
            assert res.model_version == version[0]
            return mb / dt

        def memcopy() -> float:
            t = time.perf_counter()
            dst.load_state_dict(state)
            return mb / (time.perf_counter() - t)

        def disk() -> float:
            t = time.perf_counter()
            save_file(untied(state), str(path))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            dst.load_state_dict(load_file(str(path)))
            return mb / (time.perf_counter() - t)

        r = interleave(size.reps, {"grpc": push, "mem": memcopy, "disk": disk})
        client.close()
    path.unlink(missing_ok=True)
    push_s = sorted(mb / x for x in r["grpc"])[len(r["grpc"]) // 2]
    extra = {"params_M": src.num_params() / 1e6, "MB": mb, "median_seconds_per_UpdateWeights": push_s}
    return [compare(NAME, f"{label} model", "MB/s", r["grpc"], "in-memory load_state_dict copy", r["mem"], **extra),
            compare(NAME, f"{label} model", "MB/s", r["grpc"], "safetensors write + fsync + read + load", r["disk"])]


if __name__ == "__main__":  # python -m bench.weight_sync [micro|quick|full]
    from bench.report import standalone

    standalone(run)
