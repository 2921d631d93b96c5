"""Rollout sources of the RL loop (phases 1–2, generate and score; see :mod:`chatrl.services.trainer.rl`).

:class:`RayRollout` — Ray rollout workers producing experience in parallel through the services. Each
:class:`RolloutWorker` actor takes a shard of prompts and, through the client library, calls
policy-inference ``Generate`` (n samples per prompt, token ids + logprobs + model version; a prompt is a
text or a conversation, rendered there with the model's chat template — the prompt ids it returns are what
reference and reward score),
reference-model ``LogProbs`` and reward-scoring ``Score``, and returns :class:`Experience` to the
trainer. The clients retry ``UNAVAILABLE`` with backoff; an actor that dies is restarted by Ray
(``max_restarts``) and its shard is issued again. Locally Ray starts in-process (loopback only);
with ``RAY_ADDRESS`` set the pool joins that cluster (e.g. a KubeRay RayCluster).

:class:`InProcessRollout` — the same two phases with the policy, reference and reward models in this
process and the core sampling code (no gRPC, no Ray): real computation, for tests and small experiments.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# Local Ray must advertise loopback, never this machine's own address: Ray reads this at import time.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray needs no token

from chatrl.services.core.formats import Prompt
from chatrl.services.core.seeding import derive_seed
from chatrl.services.trainer.experience import Experience

log = logging.getLogger("chatrl.rollout")


@dataclass
class Endpoints:
    """Where the services of an RL run are: ``host:port`` of policy-inference, reward-scoring,
    reference-model and feedback, the operator token (None: no auth), and per model service an optional
    DNS name listing every replica (``pipeline.replica_hosts``), to which weight pushes and LoadModel fan
    out. Whoever starts a run (the trainer service, the CLI) decides whether to launch the services."""

    policy: str
    reward: str
    reference: str
    token: str | None = None
    feedback: str = ""
    replica_hosts: dict[str, str] = field(default_factory=dict)

    def replicas(self, name: str) -> str:
        """The address that lists every replica of ``name`` (its own address without replica_hosts)."""
        addr = getattr(self, name)
        host = self.replica_hosts.get(name)
        return f"{host}:{addr.rpartition(':')[2]}" if host else addr


class RolloutWorker:
    """The actor's body (usable without Ray, e.g. in tests)."""

    def __init__(self, endpoints: Endpoints, worker_id: int = 0) -> None:
        import torch

        from chatrl.clients.lib import PolicyClient, ReferenceClient, RewardClient

        torch.set_num_threads(1)
        self.id = worker_id
        kw = {"token": endpoints.token, "timeout": 300.0, "retries": 8}
        self.policy = PolicyClient(endpoints.policy, **kw)
        self.reward = RewardClient(endpoints.reward, **kw)
        self.reference = ReferenceClient(endpoints.reference, **kw)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ref")
        self.calls = 0

    def pid(self) -> int:
        return os.getpid()

    def rollout(self, prompts: list[Prompt], n: int, max_new_tokens: int, temperature: float, seed: int,
                expected_version: int = 0) -> list[Experience]:
        self.calls += 1
        if not prompts:
            return []
        t0 = time.perf_counter()
        from chatrl.services.proto.chatrl.v1 import common_pb2
        from chatrl.services.proto.codecs import tensor_from_proto

        # generate
        res = self.policy.generate(list(prompts), n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed, expected_model_version=expected_version)
        version = res.model_version
        rows = []
        for p, r in zip(prompts, res.results):
            for c in r.completions:
                rows.append((p, list(r.prompt_token_ids), list(c.token_ids), tensor_from_proto(c.logprobs).tolist(),
                             c.finish_reason == common_pb2.FINISH_REASON_STOP, c.text))
        nonempty = [x for x in rows if x[2]]
        ref = []
        scores = []
        # score: reference logprobs and rewards are independent, so both services are asked at once
        if nonempty:
            ref_call = self._pool.submit(self.reference.logprobs, [x[1] + x[2] for x in nonempty],
                                         [len(x[1]) for x in nonempty], temperature=temperature)
            scores = list(self.reward.score_ids([x[1] for x in nonempty], [x[2] for x in nonempty]).rewards)
            ref, _ = ref_call.result()
        out = [Experience(prompt=p, prompt_ids=pi, response_ids=ri, logprobs=lp, ref_logprobs=rl.tolist(), score=s,
                          finished=fin, version=version, text=txt)
               for (p, pi, ri, lp, fin, txt), rl, s in zip(nonempty, ref, scores)]
        log.debug("worker %d: %d samples in %.2fs", self.id, len(out), time.perf_counter() - t0)
        return out


RAY_START_TIMEOUT_ENV = "CHATRL_RAY_START_TIMEOUT"


def init_ray(num_cpus: int | None = None, attempts: int = 2) -> None:
    """Join ``$RAY_ADDRESS`` if set, else start Ray in-process on loopback. Ray's own start-up waits are
    short for a busy machine (its GCS port file: 30 s), so the GCS wait is ``$CHATRL_RAY_START_TIMEOUT``
    seconds (default 300) and a failed start is tried once more before the error says what to raise."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    wait = os.environ.get(RAY_START_TIMEOUT_ENV, "300")
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(float(wait))))
    for attempt in range(1, attempts + 1):
        before = _descendants()
        try:
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
                return
            # A local, single-node Ray binds and advertises 127.0.0.1 only. Ray decides this from an env var
            # read when it is first imported; if something imported Ray before that default was set, apply it.
            ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(num_cpus=num_cpus or 2, include_dashboard=False, object_store_memory=200 * 2**20,
                     _node_ip_address="127.0.0.1", log_to_driver=False)
            return
        except Exception as e:  # Ray raises plain Exception / RuntimeError / TimeoutError here
            ray.shutdown()
            # A start that fails half-way (the raylet did not register within Ray's fixed 30 s on a loaded
            # machine) leaves its GCS, raylet and agents running, which shutdown() does not know about: they
            # would compete with the next try (measured: a second try beside them never got its GCS up)
            _kill_new_descendants(before)
            if attempt == attempts:
                raise RuntimeError(
                    f"Ray did not start ({attempts} tries): {type(e).__name__}: {e}. On a busy machine raise "
                    f"${RAY_START_TIMEOUT_ENV} (seconds, now {wait}); Ray's logs are under /tmp/ray/session_latest"
                ) from e
            log.warning("Ray start-up failed (%s: %s); trying once more", type(e).__name__, e)


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _kill_new_descendants(before: set[int]) -> None:
    """SIGKILL the processes below this one that were not there in ``before`` (what a failed start spawned)."""
    import psutil

    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    if procs:
        log.warning("stopped %d processes the failed Ray start left behind", len(procs))


class RolloutPool:
    """N Ray actors; ``collect`` shards prompts across them and gathers experience in prompt order."""

    def __init__(self, endpoints: Endpoints, num_workers: int = 2, num_cpus: float = 0.5, num_gpus: float = 0.0,
                 max_restarts: int = 3, max_attempts: int = 4) -> None:
        import ray

        init_ray()
        self.max_attempts = max_attempts
        remote = ray.remote(RolloutWorker)
        self.actors = [remote.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                      max_task_retries=0).remote(endpoints, i) for i in range(num_workers)]
        self.reissued = 0

    def submit(self, prompts: list[Prompt], n: int, max_new_tokens: int, temperature: float, seed: int,
               expected_version: int = 0) -> PendingRollout:
        shards = shard_prompts(prompts, len(self.actors))
        return PendingRollout(self, shards, (n, max_new_tokens, temperature, seed, expected_version))

    def collect(self, prompts: list[Prompt], n: int, max_new_tokens: int, temperature: float, seed: int,
                expected_version: int = 0) -> list[Experience]:
        return self.submit(prompts, n, max_new_tokens, temperature, seed, expected_version).result()

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def shard_prompts(prompts: list[Prompt], n: int) -> list[list[Prompt]]:
    """``n`` contiguous shards of near-equal size, in order. Split by index: numpy would turn a list of
    conversations of equal length into a 2-D array of messages."""
    return [[prompts[i] for i in s] for s in np.array_split(np.arange(len(prompts)), n)]


class PendingRollout:
    """Shards in flight; ``result()`` gathers them, re-issuing the shard of a worker that died."""

    def __init__(self, pool: RolloutPool, shards: list[list[str]], args: tuple) -> None:
        self.pool, self.shards, self.args = pool, shards, args
        self.attempts = [0] * len(shards)
        self.futures = {self._launch(i): i for i in range(len(shards)) if shards[i]}

    def _launch(self, i: int):
        n, mnt, temp, seed, ver = self.args
        actor = self.pool.actors[(i + self.attempts[i]) % len(self.pool.actors)]
        self.attempts[i] += 1
        return actor.rollout.remote(self.shards[i], n, mnt, temp, derive_seed(seed, "shard", i), ver)

    def result(self) -> list[Experience]:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        out: dict[int, list[Experience]] = {}
        while self.futures:
            ready, _ = ray.wait(list(self.futures), num_returns=1)
            fut = ready[0]
            i = self.futures.pop(fut)
            try:
                out[i] = ray.get(fut)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                if self.attempts[i] >= self.pool.max_attempts:
                    raise RuntimeError(f"rollout shard {i} failed {self.attempts[i]} times: {e}") from e
                log.warning("rollout worker died on shard %d (%s); re-issuing", i, type(e).__name__)
                self.pool.reissued += 1
                self.futures[self._launch(i)] = i
        return [e for i in sorted(out) for e in out[i]]


class RayRollout:
    """The RL loop's rollout source through the services: a :class:`RolloutPool` of Ray workers sampling
    ``samples_per_prompt`` responses of at most ``max_new_tokens`` at ``temperature``. Without a staleness
    allowance (``max_staleness`` 0) a Generate must be served by exactly the trainer's version."""

    def __init__(self, endpoints: Endpoints, ppo, pool: RolloutPool | None = None) -> None:
        self.pc = ppo
        self.pool = pool or RolloutPool(endpoints, ppo.num_workers, ppo.worker_num_cpus, ppo.worker_num_gpus)

    def submit(self, prompts: list[Prompt], version: int, seed: int) -> PendingRollout:
        pc = self.pc
        return self.pool.submit(prompts, pc.samples_per_prompt, pc.max_new_tokens, pc.temperature, seed,
                                expected_version=0 if pc.max_staleness else version)

    def close(self) -> None:
        self.pool.close()


# --- in-process -------------------------------------------------------------------------------------------
Reward = Callable[[list[int], list[int]], float]  # (prompt ids, response ids incl. the end token) → score


def reward_model_scorer(ckpt, device: str = "cpu", dtype: str | None = None) -> Reward:
    """The reward model of a checkpoint scoring token ids the way reward-scoring does: the scalar head at
    the last token of prompt+response (its end kept, the prompt's start trimmed to fit) plus the bias."""
    import torch

    from chatrl.services.core.scoring import last_token_scalar
    from chatrl.services.trainer.stages.common import model_from_checkpoint, tokenizer_from_checkpoint

    model = model_from_checkpoint(ckpt, scalar_head=True, device=device).eval()
    pad = tokenizer_from_checkpoint(ckpt).pad_id
    bias = float(ckpt.manifest.get("meta", {}).get("reward_bias", 0.0))

    @torch.no_grad()
    def score(prompt_ids: list[int], response_ids: list[int]) -> float:
        ids = (prompt_ids + response_ids)[-model.cfg.max_seq_len:]
        return float(last_token_scalar(model, [ids], pad, dtype, device)[0]) + bias

    return score


class _Done:
    def __init__(self, exps: list[Experience]) -> None:
        self.exps = exps

    def result(self) -> list[Experience]:
        return self.exps


class InProcessRollout:
    """Generate with ``policy`` (a GPT; pass the trainer's own policy module to sample on-policy without
    weight pushes), reference logprobs from ``reference``, scores from ``reward`` — all in this process.
    ``submit`` computes at once (so with overlap, the samples are of the version at submit time)."""

    def __init__(self, policy, reference, reward: Reward, tok, samples_per_prompt: int, max_new_tokens: int,
                 temperature: float = 1.0, dtype: str | None = None, device: str = "cpu") -> None:
        self.policy, self.reference, self.reward, self.tok = policy, reference, reward, tok
        self.n, self.max_new_tokens, self.temperature = samples_per_prompt, max_new_tokens, temperature
        self.dtype, self.device = dtype, device

    @classmethod
    def for_config(cls, cfg, policy, reference, reward: Reward, tok) -> InProcessRollout:
        pc = cfg.ppo
        return cls(policy, reference, reward, tok, pc.samples_per_prompt, pc.max_new_tokens, pc.temperature,
                   cfg.dtype, cfg.device)

    def submit(self, prompts: list[Prompt], version: int, seed: int) -> _Done:
        import torch

        from chatrl.services.core.generate import SamplingParams, generate, sequence_logprobs

        tok = self.tok
        rows = [(p, tok.prompt_ids(p)) for p in prompts for _ in range(self.n)]
        params = [SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed + i,
                                 stop_token_ids=(tok.end_id,)) for i in range(len(rows))]
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():  # generate
            samples = generate(self.policy, [pi for _, pi in rows], params, tok.pad_id, self.dtype, self.device)
        self.policy.train(was_training)
        keep = [(p, pi, s) for (p, pi), s in zip(rows, samples) if s.tokens]
        if not keep:
            return _Done([])
        with torch.no_grad():  # score: reference logprobs and reward of each response
            ref = sequence_logprobs(self.reference, [pi + s.tokens for _, pi, s in keep], tok.pad_id,
                                    self.temperature, self.dtype, self.device)
        return _Done([Experience(prompt=p, prompt_ids=pi, response_ids=s.tokens, logprobs=s.logprobs,
                                 ref_logprobs=r[len(pi):], score=self.reward(pi, s.tokens),
                                 finished=s.finish_reason == "stop", version=version,
                                 text=tok.response_text(s.tokens)[0])
                      for (p, pi, s), r in zip(keep, ref)])

    def close(self) -> None:
        pass
