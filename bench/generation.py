"""1. Generation: policy-inference ``Generate`` over gRPC vs Hugging Face ``transformers`` ``generate()``
in-process, on models of the same shape (chatrl GPT vs a GPT-2 config of equal depth / width / heads /
vocab / context, both random weights), same prompts (token ids), same number of new tokens (no stop
token: the policy has no tokenizer, GPT-2's eos is unset), greedy and sampled (T = 1, no top-k/top-p),
batch 1 / 8 / 32 — and N concurrent single-prompt clients (the engine batches them dynamically) against
HF serving the same N requests one at a time and as one static batch.

Threads: the policy service runs with 1 torch thread; HF runs in this process with 1 torch thread.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import (
    Row,
    ServiceProc,
    Size,
    Workdir,
    compare,
    gpt_config,
    hf_gpt2_config,
    interleave,
    log,
    random_gpt,
    torch_threads,
)

NAME = "generation"
PEER = "HF transformers generate()"


def _hf_model(cfg):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(hf_gpt2_config(cfg)).eval()


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, sampled: bool, seed: int) -> int:
    """Returns the number of generated tokens."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sampled else {"do_sample": False}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, pad_token_id=0,
                          **kw)
    n = (out.shape[1] - ids.shape[1]) * out.shape[0]
    assert n == new_tokens * len(prompts), f"HF generated {n} tokens, expected {new_tokens * len(prompts)}"
    return n


def run(size: Size, wd: Workdir) -> list[Row]:
    import torch

    from chatrl.clients.lib import PolicyClient

    cfg = gpt_config(size)
    model = random_gpt(cfg)
    hf = _hf_model(cfg)
    g = torch.Generator().manual_seed(1)
    n_new = size.gen_new_tokens
    rows: list[Row] = []
    params = {"chatrl_params": model.num_params(), "hf_params": hf.num_parameters()}
    with ServiceProc("policy", wd.path / "logs", threads=1, metrics=True,
                     max_batch_size=max(32, size.gen_concurrent)) as svc:
        svc.wait(serving=False)
        client = PolicyClient(svc.address, timeout=600)
        client.update_weights(model.state_dict(), 1, metadata={"config_json": json.dumps(cfg.to_dict())})
        svc.wait(serving=True)

        def ours(prompts, sampled, seed):
            def fn() -> float:
                t = time.perf_counter()
                res = client.generate(prompts, max_new_tokens=n_new, temperature=1.0 if sampled else 0.0, seed=seed)
                dt = time.perf_counter() - t
                toks = sum(len(c.token_ids) for r in res.results for c in r.completions)
                assert toks == len(prompts) * n_new, f"expected {len(prompts) * n_new} tokens, got {toks}"
                return toks / dt
            return fn

        def theirs(prompts, sampled, seed):
            def fn() -> float:
                with torch_threads(1):
                    t = time.perf_counter()
                    toks = hf_generate(hf, prompts, n_new, sampled, seed)
                    return toks / (time.perf_counter() - t)
            return fn

        for sampled in (False, True):
            mode = "sampled" if sampled else "greedy"
            for b in size.gen_batches:
                prompts = torch.randint(8, cfg.vocab_size, (b, size.gen_prompt_len), generator=g).tolist()
                log(f"generation: {mode} batch {b}")
                r = interleave(size.reps, {"chatrl": ours(prompts, sampled, 7), "peer": theirs(prompts, sampled, 7)})
                rows.append(compare(NAME, f"{mode}, batch {b}", "tokens/s", r["chatrl"], PEER, r["peer"],
                                    prompt_len=size.gen_prompt_len, new_tokens=n_new, **params))

        # N concurrent single-prompt clients (continuous batching) vs HF one request at a time / one batch
        n = size.gen_concurrent
        prompts = torch.randint(8, cfg.vocab_size, (n, size.gen_prompt_len), generator=g).tolist()
        pool = ThreadPoolExecutor(n)

        def concurrent() -> float:
            t = time.perf_counter()
            futs = [pool.submit(client.generate, [p], max_new_tokens=n_new, temperature=1.0, seed=i)
                    for i, p in enumerate(prompts)]
            toks = sum(len(c.token_ids) for f in futs for r in f.result().results for c in r.completions)
            return toks / (time.perf_counter() - t)

        def hf_sequential() -> float:
            with torch_threads(1):
                t = time.perf_counter()
                toks = sum(hf_generate(hf, [p], n_new, True, i) for i, p in enumerate(prompts))
                return toks / (time.perf_counter() - t)

        log(f"generation: {n} concurrent clients")
        before = _batch_stats(svc)
        r = interleave(size.reps, {"chatrl": concurrent, "seq": hf_sequential, "batch": theirs(prompts, True, 3)})
        rows.append(compare(NAME, f"{n} concurrent clients (sampled)", "tokens/s", r["chatrl"],
                            "HF generate(), one request at a time", r["seq"], **params))
        rows.append(compare(NAME, f"{n} concurrent clients (sampled)", "tokens/s", r["chatrl"],
                            f"HF generate(), one static batch of {n}", r["batch"],
                            mean_engine_batch=_mean_batch(before, _batch_stats(svc))))
        pool.shutdown()
        client.close()
    return rows


def _batch_stats(svc: ServiceProc) -> tuple[float, float]:
    """(sum, count) of the policy's per-step batch-size histogram (its Prometheus metrics)."""
    return svc.metric("chatrl_policy_batch_size_sum"), svc.metric("chatrl_policy_batch_size_count")


def _mean_batch(a, b) -> float | None:
    n = b[1] - a[1]
    return (b[0] - a[0]) / n if n else None


if __name__ == "__main__":  # python -m bench.generation [micro|quick|full]
    from bench.report import standalone

    standalone(run)
