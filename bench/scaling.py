"""6. Scaling: PPO rollout throughput (samples/s: Generate + LogProbs + Score through the services, Ray
``RolloutPool.collect``) with 1, 2 and 4 rollout workers, same prompts, interleaved. No peer: the ratio is to
one worker. On 2 cores the services (one torch thread each) are the bottleneck — more workers can only
overlap one shard's scoring with another's generation and let the policy batch shards together.
"""

from __future__ import annotations

import time

from bench.common import Row, Size, Workdir, compare, interleave, log, prompts_text

NAME = "scaling"


def run(size: Size, wd: Workdir) -> tuple[list[Row], list[str]]:
    from bench import stack as stk
    from chatrl.services.trainer.rollout import RolloutPool

    stk.init_ray()
    stack = stk.start(size, wd)
    pools: dict[int, RolloutPool] = {}
    try:
        share = 2.0 / sum(size.scale_workers)  # Ray CPUs per actor, so that every pool fits at once
        for w in size.scale_workers:
            pools[w] = RolloutPool(stack.endpoints, num_workers=w, num_cpus=share)
        prompts = prompts_text(size.scale_prompts, seed=3)
        counter = [0]

        def collect(pool: RolloutPool):
            def fn() -> float:
                counter[0] += 1
                t = time.perf_counter()
                exps = pool.collect(prompts, size.scale_samples, size.scale_new_tokens, 1.0, seed=counter[0])
                return len(exps) / (time.perf_counter() - t)
            return fn

        log(f"scaling: workers {size.scale_workers}")
        r = interleave(size.reps, {w: collect(p) for w, p in pools.items()})
    finally:
        for p in pools.values():
            p.close()
        stack.close()
    base = size.scale_workers[0]
    rows = [compare(NAME, f"rollout, {w} worker{'s' if w > 1 else ''}", "samples/s", r[w],
                    f"{base} worker" if w != base else "", r[base] if w != base else None,
                    prompts=size.scale_prompts, samples_per_prompt=size.scale_samples,
                    max_new_tokens=size.scale_new_tokens)
            for w in size.scale_workers]
    return rows, ["ratio = samples/s with N workers ÷ with 1 worker, per interleaved repeat"]


if __name__ == "__main__":
    from bench.report import standalone

    standalone(run)
