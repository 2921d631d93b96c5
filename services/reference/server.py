"""reference-model service: ``LogProbs`` of token sequences under the frozen SFT model, ``LoadModel``,
``GetModelInfo``. Concurrent calls are micro-batched (right-padded) through one forward pass.

Element i of a sequence's result is log p(token_ids[response_start + i] | token_ids[:response_start + i])
under softmax(logits / temperature) — aligned with the policy's ``Completion.logprobs`` when
``response_start = len(prompt_token_ids)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge, Histogram

from chatrl.services.core.generate import head_logprobs
from chatrl.services.core.model import autocast, resolve_dtype
from chatrl.services.core.scoring import right_pad
from chatrl.services.proto.chatrl.v1 import reference_pb2, reference_pb2_grpc
from chatrl.services.proto.codecs import tensor_to_proto as to_proto
from chatrl.services.runtime.batcher import MicroBatcher
from chatrl.services.runtime.errors import check_range, check_token_ids, precondition, require
from chatrl.services.runtime.main import run_service
from chatrl.services.runtime.model_host import ModelHost, ServedModel
from chatrl.services.runtime.server import ServerConfig, ServiceServer

MAX_SEQUENCES = 4096


@dataclass
class ReferenceConfig:
    checkpoint: str = ""  # the frozen SFT checkpoint; empty = LoadModel later
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 1
    max_batch: int = 64  # sequences per forward pass
    max_batch_tokens: int = 16384  # tokens (summed lengths) per forward pass; a longer sequence goes alone
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    logprob_chunk_elems: int = 1 << 24  # logits per slice of the LM head + log-softmax (64 MiB in fp32)

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)  # auto → bf16 where native, else fp32


class ReferenceServicer(reference_pb2_grpc.ReferenceModelServiceServicer):
    def __init__(self, cfg: ReferenceConfig, registry) -> None:
        self.cfg = cfg
        self.host = ModelHost("reference-model", scalar_head=False, device=cfg.device, dtype=cfg.dtype)
        # cost: a sequence's tokens (the batch's logits are B x T_max x V)
        self.batcher = MicroBatcher(self._batch, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue,
                                    name="reference-batcher", cost=lambda it: len(it[1]),
                                    max_cost=cfg.max_batch_tokens)
        self.m_tokens = Counter("chatrl_reference_tokens_total", "response tokens scored", registry=registry)
        self.m_batch = Histogram("chatrl_reference_batch_size", "sequences per forward pass",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.served = ServedModel(self.host, Gauge("chatrl_reference_model_version", "loaded model version",
                                                   registry=registry))
        Gauge("chatrl_reference_queue_depth", "sequences waiting", registry=registry).set_function(
            self.batcher.depth)

    def _batch(self, items):
        """items: (snapshot, ids, response_start, temperature) → float32 tensors [len - start]."""
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (snap, _, _, temp) in enumerate(items):
            groups.setdefault((id(snap), temp), []).append(i)
        for (_, temp), idx in groups.items():
            snap = items[idx[0]][0]
            ids, mask = right_pad([items[i][1] for i in idx], snap.tok.pad_id, self.cfg.device)
            want = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
            for row, i in enumerate(idx):  # the positions that predict a response token
                _, seq, start, _ = items[i]
                want[row, start - 1: len(seq) - 1] = True
            with torch.no_grad(), autocast(self.cfg.dtype, self.cfg.device.split(":")[0]):
                hidden = snap.model(ids, mask, lm_head=False).hidden  # the LM head on response tokens only
                lp = head_logprobs(snap.model.lm_head, hidden[:, :-1][want], ids[:, 1:][want], temp,
                                   self.cfg.logprob_chunk_elems).cpu()
            at = 0
            for i in idx:
                _, seq, start, _ = items[i]
                out[i] = lp[at:at + len(seq) - start].clone()
                at += len(seq) - start
        self.m_batch.observe(len(items))
        return out

    def close(self) -> None:
        self.batcher.close()

    def LogProbs(self, request, context):
        snap = self.host.current()
        require(len(request.sequences) > 0, "sequences", "must not be empty")
        require(len(request.sequences) <= MAX_SEQUENCES, "sequences",
                f"at most {MAX_SEQUENCES} per call, got {len(request.sequences)}")
        temp = request.temperature if request.HasField("temperature") else 1.0
        check_range(temp, 0.0, 10.0, "temperature", lo_open=True)
        max_len = snap.model.cfg.max_seq_len
        items = []
        for i, s in enumerate(request.sequences):
            f = f"sequences[{i}]"
            require(len(s.token_ids) <= max_len, f"{f}.token_ids",
                    f"length {len(s.token_ids)} exceeds the model's {max_len}")  # counted before it is copied
            ids = check_token_ids(s.token_ids, snap.tok.vocab_size, f"{f}.token_ids")
            require(1 <= s.response_start <= len(ids), f"{f}.response_start",
                    f"must be in [1, {len(ids)}], got {s.response_start}")
            items.append((snap, ids, s.response_start, float(temp)))
        res = self.batcher.submit(items)
        for i, t in enumerate(res):
            if not torch.isfinite(t).all():  # an overflow (bf16, a tiny temperature) must not pass as data
                raise precondition(f"sequences[{i}]: the reference model produced non-finite log-probs "
                                   f"(temperature {temp:g}, dtype {self.cfg.dtype})")
        n = sum(t.numel() for t in res)
        self.m_tokens.inc(n)
        return reference_pb2.LogProbsResponse(logprobs=[to_proto(t) for t in res], model_version=snap.version)

    def LoadModel(self, request, context):
        self.served.load(request.checkpoint_uri, request.model_version, request.sha256)
        return reference_pb2.ReferenceModelServiceLoadModelResponse(info=self.host.info())

    def GetModelInfo(self, request, context):
        return reference_pb2.ReferenceModelServiceGetModelInfoResponse(info=self.host.info())


def build(server_cfg: ServerConfig, cfg: ReferenceConfig) -> tuple[ServiceServer, ReferenceServicer]:
    torch.set_num_threads(max(1, cfg.threads))
    srv = ServiceServer("reference", server_cfg)
    svc = ReferenceServicer(cfg, srv.registry)
    srv.add_service(reference_pb2_grpc.add_ReferenceModelServiceServicer_to_server, svc,
                    reference_pb2.DESCRIPTOR.services_by_name["ReferenceModelService"].full_name)
    svc.served.start(srv, cfg.checkpoint)
    return srv, svc


def main(argv: list[str] | None = None) -> int:
    return run_service("reference", ReferenceConfig, build, argv)
