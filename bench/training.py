"""5. Training efficiency: pre-training tokens/s of the default model (the loop of
``services/trainer/stages/pretrain.py``: forward, next-token loss, backward, grad clip, AdamW) in fp32 and
under bf16 autocast, and the achieved FLOP/s as a fraction of this machine's measured matmul peak (the
best of several large ``torch.mm`` calls, same dtype, same threads). Peer: the same loop on an HF GPT-2 of
the same shape. FLOPs per token = 6·N_matmul + 12·L·T·d (N_matmul = L·12d² + V·d: the block linears and
the LM head; 12·L·T·d: attention scores and mixing, forward + backward).

Threads: ``bench.common.train_threads()`` (1 unless ``--threads``), for the matmul peak too, so the
fraction is of the peak of the cores actually used."""

from __future__ import annotations

import time

from bench.common import (
    Row,
    Size,
    Workdir,
    compare,
    gpt_config,
    hf_gpt2_config,
    interleave,
    log,
    random_gpt,
    torch_threads,
    train_threads,
)

NAME = "training"


def matmul_peak(n: int, dtype, reps: int = 10) -> float:
    """FLOP/s of the best of ``reps`` n×n×n matmuls (after a warm-up)."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def flops_per_token(cfg, seq_len: int) -> float:
    n_matmul = cfg.n_layer * 12 * cfg.d_model ** 2 + cfg.vocab_size * cfg.d_model
    return 6 * n_matmul + 12 * cfg.n_layer * seq_len * cfg.d_model


def run(size: Size, wd: Workdir) -> tuple[list[Row], list[str]]:
    import torch

    cfg = gpt_config(size)
    tokens = torch.randint(0, cfg.vocab_size, (64, size.train_seq + 1), generator=torch.Generator().manual_seed(0))
    fpt = flops_per_token(cfg, size.train_seq)
    dts = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows: list[Row] = []
    notes: list[str] = []
    results = []
    threads = train_threads()
    with torch_threads(threads):
        # the peak is the best of several attempts spread over the benchmark (other work on the machine only
        # ever lowers a measurement)
        peaks = {k: matmul_peak(size.peak_n, dt) for k, dt in dts.items()}
        for dtype in dts:
            log(f"training: {dtype}")
            results.append((dtype, _one_dtype(size, cfg, tokens, dtype)))
            for k, dt in dts.items():
                peaks[k] = max(peaks[k], matmul_peak(size.peak_n, dt))
    for k in dts:
        notes.append(f"measured matmul peak {k} ({threads} thread{'s' if threads > 1 else ''}, {size.peak_n}² matmul, best of 30): "
                     f"{peaks[k] / 1e9:.1f} GFLOP/s")
    bsz, seq = size.train_batch, size.train_seq
    for dtype, r in results:
        med = sorted(r["chatrl"])[len(r["chatrl"]) // 2]
        med_h = sorted(r["hf"])[len(r["hf"]) // 2]
        rows.append(compare(NAME, f"pre-training {dtype}, batch {bsz}×{seq}", "tokens/s", r["chatrl"],
                            "HF GPT-2, same loop", r["hf"], MFLOP_per_token=fpt / 1e6,
                            chatrl_GFLOP_per_s=med * fpt / 1e9, chatrl_fraction_of_peak=med * fpt / peaks[dtype],
                            chatrl_best_fraction_of_peak=max(r["chatrl"]) * fpt / peaks[dtype],
                            hf_fraction_of_peak=med_h * fpt / peaks[dtype], threads=threads))
    return rows, notes


def _one_dtype(size: Size, cfg, tokens, dtype: str) -> dict[str, list[float]]:
    import torch
    from transformers import GPT2LMHeadModel

    from chatrl.services.core.model import autocast
    from chatrl.services.trainer import algos
    from chatrl.services.trainer.stages.common import make_optimizer

    bsz, seq = size.train_batch, size.train_seq
    ours = random_gpt(cfg).train()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_gpt2_config(cfg)).train()
    step = [0]

    def batch():
        i = step[0] % (len(tokens) // bsz)
        step[0] += 1
        return tokens[i * bsz:(i + 1) * bsz]

    def loop(model):
        opt = make_optimizer(model, 3e-3, 0.1)

        def fn() -> float:
            t = time.perf_counter()
            for _ in range(size.train_steps):
                xb = batch()
                with autocast(dtype):
                    logits = model(xb[:, :-1]).logits
                loss = algos.lm_loss(logits.float(), xb[:, 1:])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                loss.item()
            return size.train_steps * bsz * seq / (time.perf_counter() - t)
        return fn

    return interleave(size.reps, {"chatrl": loop(ours), "hf": loop(hf)})


if __name__ == "__main__":
    from bench.report import standalone

    standalone(run)
