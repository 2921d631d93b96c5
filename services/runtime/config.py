"""Service configuration: one YAML file (``configs/services.yaml``) with a section per service.

Each section holds the :class:`ServerConfig` fields (host, port, metrics_port, auth, TLS, …) and the
service's own fields (checkpoint, device, batching, …). ``--set policy.port=6000`` overrides work
like the run config's."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from chatrl.services.core.config import ConfigError, apply_overrides, from_dict
from chatrl.services.runtime.server import ServerConfig, server_fields

SERVICES = ("policy", "reward", "reference", "trainer", "feedback")


def load_services_config(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, dict]:
    d: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"service config not found: {p}")
        d = yaml.safe_load(p.read_text()) or {}
    d = apply_overrides(d, overrides or [])
    unknown = set(d) - set(SERVICES) - {"common"}
    if unknown:
        raise ConfigError(f"unknown service section {sorted(unknown)[0]!r} (expected one of {SERVICES} or common)")
    common = d.get("common", {}) or {}
    bad = sorted(set(common) - server_fields())
    if bad:
        raise ConfigError(f"common.{bad[0]}: only server fields ({', '.join(sorted(server_fields()))}) may be common")
    return {s: {**common, **(d.get(s) or {})} for s in SERVICES}


def split_config(section: dict[str, Any], service_cls: type, name: str) -> tuple[ServerConfig, Any]:
    """Split a service's section into its ServerConfig and its own dataclass (unknown keys are errors)."""
    srv = {k: v for k, v in section.items() if k in server_fields()}
    own = {k: v for k, v in section.items() if k not in server_fields()}
    assert is_dataclass(service_cls)
    names = {f.name for f in fields(service_cls)}
    extra = sorted(set(own) - names)
    if extra:
        raise ConfigError(f"unknown config field {name}.{extra[0]}")
    return from_dict(ServerConfig, srv, name), from_dict(service_cls, own, name)
