"""``python -m services.<name>`` / ``chatrl serve <name>``: load the service config, build, serve until
SIGTERM, drain, exit 0."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from chatrl.services.core.config import ConfigError
from chatrl.services.runtime.config import load_services_config, split_config
from chatrl.services.runtime.logs import setup_logging
from chatrl.services.runtime.memory import start_trimmer

log = logging.getLogger("chatrl.main")


def parse_args(service: str, argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"chatrl serve {service}")
    ap.add_argument("--config", "-c", default=None, help="service config YAML (configs/services.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a field of the {service} section, e.g. --set port=50051")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--metrics-port", type=int)
    ap.add_argument("--checkpoint", help="model checkpoint directory (model services)")
    return ap.parse_args(argv)


def service_config(service: str, cfg_cls: type, args: argparse.Namespace):
    overrides = [f"{service}.{o}" for o in args.set]
    for flag, key in (("host", "host"), ("port", "port"), ("metrics_port", "metrics_port"),
                      ("checkpoint", "checkpoint")):
        v = getattr(args, flag, None)
        if v is not None:
            overrides.append(f"{service}.{key}={v}")
    sections = load_services_config(args.config, overrides)
    return split_config(sections[service], cfg_cls, service)


def run_service(service: str, cfg_cls: type, build: Callable, argv: list[str] | None = None) -> int:
    args = parse_args(service, argv)
    try:
        server_cfg, cfg = service_config(service, cfg_cls, args)
    except ConfigError as e:
        print(f"chatrl serve {service}: error: {e}")
        return 2
    setup_logging(server_cfg.log_json)
    start_trimmer()  # model loads and weight pushes free hundreds of MB at a time: return them to the OS
    srv, svc = build(server_cfg, cfg)
    print(f"{service} serving on {srv.address} (metrics :{srv.metrics_port or 'off'})", flush=True)
    srv.serve_forever(on_stop=getattr(svc, "close", None))
    return 0
