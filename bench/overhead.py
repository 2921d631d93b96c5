"""4. Overhead: latency of a 1-token Generate (greedy, one prompt) over gRPC on 127.0.0.1 vs the same call
in-process — submitted to a :class:`GenerationEngine` in this process (the engine the service wraps), and
as a bare ``chatrl.services.core.generate.generate()`` call (no engine, no threads). p50 / p99 per repeat; the
calls alternate in blocks so both sides see the same background load."""

from __future__ import annotations

import json
import time

from bench.common import (
    Row,
    ServiceProc,
    Size,
    Workdir,
    compare,
    gpt_config,
    log,
    percentile,
    random_gpt,
    torch_threads,
)

NAME = "overhead"


def run(size: Size, wd: Workdir) -> list[Row]:
    import torch

    from chatrl.clients.lib import PolicyClient
    from chatrl.services.core.generate import SamplingParams, generate
    from chatrl.services.policy.engine import GenerationEngine

    cfg = gpt_config(size)
    model = random_gpt(cfg)
    prompt = torch.randint(8, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    calls = size.overhead_calls
    block = max(5, calls // 10)
    lat: dict[str, list[float]] = {"grpc": [], "engine": [], "bare": []}
    per_rep: dict[str, dict[str, list[float]]] = {k: {"p50": [], "p99": []} for k in lat}
    with ServiceProc("policy", wd.path / "logs", threads=1) as svc, torch_threads(1):
        svc.wait(serving=False)
        client = PolicyClient(svc.address, timeout=60)
        client.update_weights(model.state_dict(), 1, metadata={"config_json": json.dumps(cfg.to_dict())})
        svc.wait(serving=True)
        engine = GenerationEngine(random_gpt(cfg), None, max_batch_size=32, name="bench-engine")

        def grpc_call():
            res = client.generate([prompt], max_new_tokens=1, temperature=0.0)
            assert len(res.results[0].completions[0].token_ids) == 1

        def engine_call():
            r = engine.submit(prompt, params).result()
            assert len(r.samples[0].token_ids) == 1

        def bare_call():
            out = generate(model, [prompt], params)
            assert len(out[0].tokens) == 1

        fns = {"grpc": grpc_call, "engine": engine_call, "bare": bare_call}
        for fn in fns.values():  # warm-up (channel, first forward)
            for _ in range(5):
                fn()
        log(f"overhead: {size.reps} × {calls} calls per side")
        for rep in range(size.reps):
            got: dict[str, list[float]] = {k: [] for k in fns}
            done = 0
            while done < calls:
                for k, fn in (fns.items() if (rep + done // block) % 2 == 0 else reversed(list(fns.items()))):
                    for _ in range(block):
                        t = time.perf_counter()
                        fn()
                        got[k].append((time.perf_counter() - t) * 1000)
                done += block
            for k, v in got.items():
                lat[k] += v
                per_rep[k]["p50"].append(percentile(v, 50))
                per_rep[k]["p99"].append(percentile(v, 99))
        engine.shutdown()
        client.close()
    rows = []
    for q in ("p50", "p99"):
        for peer, label in (("engine", "in-process GenerationEngine.submit()"), ("bare", "in-process generate()")):
            rows.append(compare(NAME, f"1-token Generate {q} latency", "ms", per_rep["grpc"][q], label, per_rep[peer][q],
                                higher_is_better=False,
                                overhead_ms=percentile(lat["grpc"], int(q[1:])) - percentile(lat[peer], int(q[1:])),
                                calls=len(lat["grpc"])))
    return rows


if __name__ == "__main__":  # python -m bench.overhead [micro|quick|full]
    from bench.report import standalone

    standalone(run)
