"""reward-scoring service: ``Score``, ``LoadModel``, ``GetModelInfo`` over a reward-model checkpoint.

Concurrent ``Score`` calls are micro-batched through one forward pass. The reward of a pair is the RM's
scalar at the last token of ``<|user|>prompt<|end|><|assistant|>response[<|end|>]`` plus the bias stored
with the checkpoint (so SFT samples average 0). A response given as token ids ends its turn when its
last token is the end token; a text response is taken as a finished turn."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge, Histogram

from chatrl.services.core.model import resolve_dtype
from chatrl.services.core.scoring import last_token_scalar, pair_ids
from chatrl.services.proto.chatrl.v1 import reward_pb2, reward_pb2_grpc
from chatrl.services.runtime.batcher import MicroBatcher
from chatrl.services.runtime.errors import check_token_ids, invalid, require
from chatrl.services.runtime.main import run_service
from chatrl.services.runtime.model_host import ModelHost, ServedModel
from chatrl.services.runtime.server import ServerConfig, ServiceServer

MAX_ITEMS = 4096


@dataclass
class RewardConfig:
    checkpoint: str = ""  # reward-model checkpoint dir (a stage dir with LATEST works); empty = LoadModel later
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 1  # torch threads of this process
    max_batch: int = 64  # pairs per forward pass
    max_batch_tokens: int = 16384  # tokens (summed lengths) per forward pass; a longer pair goes alone
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests to join a batch
    max_queue: int = 4096  # pairs waiting; beyond → RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)  # auto → bf16 where native, else fp32


class RewardServicer(reward_pb2_grpc.RewardScoringServiceServicer):
    def __init__(self, cfg: RewardConfig, registry) -> None:
        self.cfg = cfg
        self.host = ModelHost("reward-model", scalar_head=True, device=cfg.device, dtype=cfg.dtype)
        self.batcher = MicroBatcher(self._score_batch, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue,
                                    name="reward-batcher", cost=lambda it: len(it[1]),
                                    max_cost=cfg.max_batch_tokens)
        self.m_scored = Counter("chatrl_reward_pairs_scored_total", "pairs scored", registry=registry)
        self.m_batch = Histogram("chatrl_reward_batch_size", "pairs per forward pass",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.m_reward = Histogram("chatrl_reward_score", "rewards returned",
                                  buckets=(-5, -2, -1, -0.5, 0, 0.5, 1, 2, 5), registry=registry)
        self.served = ServedModel(self.host, Gauge("chatrl_reward_model_version", "loaded reward-model version",
                                                   registry=registry))
        self.m_queue = Gauge("chatrl_reward_queue_depth", "pairs waiting to be scored", registry=registry)
        self.m_queue.set_function(self.batcher.depth)

    # items: (snapshot, ids)
    def _score_batch(self, items):
        out = [0.0] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (snap, _) in enumerate(items):
            groups.setdefault(id(snap), []).append(i)
        for idx in groups.values():
            snap = items[idx[0]][0]
            with torch.no_grad():
                r = last_token_scalar(snap.model, [items[i][1] for i in idx], snap.tok.pad_id,
                                      self.cfg.dtype, self.cfg.device)
            bias = float(snap.meta.get("reward_bias", 0.0))
            for i, v in zip(idx, r.tolist()):
                out[i] = v + bias
        self.m_batch.observe(len(items))
        return out

    def close(self) -> None:
        self.batcher.close()

    def Score(self, request, context):
        snap = self.host.current()
        tok, max_len = snap.tok, snap.model.cfg.max_seq_len
        require(len(request.items) > 0, "items", "must not be empty")
        require(len(request.items) <= MAX_ITEMS, "items", f"at most {MAX_ITEMS} per call, got {len(request.items)}")
        seqs = []
        cap = 4 * max_len  # longer pairs are cut to their last max_len tokens; far longer ones are refused
        for i, it in enumerate(request.items):
            f = f"items[{i}]"
            if it.prompt_token_ids:
                p = check_token_ids(it.prompt_token_ids, tok.vocab_size, f"{f}.prompt_token_ids", max_len=cap)
            else:
                require(bool(it.prompt.strip()), f"{f}.prompt", "must not be empty (or give prompt_token_ids)")
                require(len(it.prompt) <= 16 * cap, f"{f}.prompt", f"at most {16 * cap} characters")
                p = tok.prompt_ids(it.prompt)
            if it.response_token_ids:
                r = check_token_ids(it.response_token_ids, tok.vocab_size, f"{f}.response_token_ids",
                                    max_len=cap)
                ids = p + r
            else:
                ids = p + tok.encode(it.response) + [tok.end_id]
            if len(ids) > max_len:
                if it.prompt_token_ids or it.response_token_ids:
                    ids = ids[-max_len:]
                else:
                    ids = pair_ids(tok, it.prompt, it.response, True, max_len)
            seqs.append((snap, ids))
        rewards = self.batcher.submit(seqs)
        for r in rewards:
            if not math.isfinite(r):
                raise invalid("items", "the reward model produced a non-finite reward")
            self.m_reward.observe(r)
        self.m_scored.inc(len(rewards))
        return reward_pb2.ScoreResponse(rewards=rewards, model_version=snap.version)

    def LoadModel(self, request, context):
        self.served.load(request.checkpoint_uri, request.model_version, request.sha256)
        return reward_pb2.RewardScoringServiceLoadModelResponse(info=self.host.info())

    def GetModelInfo(self, request, context):
        return reward_pb2.RewardScoringServiceGetModelInfoResponse(info=self.host.info())


def build(server_cfg: ServerConfig, cfg: RewardConfig) -> tuple[ServiceServer, RewardServicer]:
    torch.set_num_threads(max(1, cfg.threads))
    srv = ServiceServer("reward", server_cfg)
    svc = RewardServicer(cfg, srv.registry)
    srv.add_service(reward_pb2_grpc.add_RewardScoringServiceServicer_to_server, svc,
                    reward_pb2.DESCRIPTOR.services_by_name["RewardScoringService"].full_name)
    svc.served.start(srv, cfg.checkpoint)
    return srv, svc


def main(argv: list[str] | None = None) -> int:
    return run_service("reward", RewardConfig, build, argv)
