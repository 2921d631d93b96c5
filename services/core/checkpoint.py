"""Checkpoints: safetensors files + a JSON manifest, written atomically, verified on load.

Layout of one checkpoint directory::

    <root>/<name>/manifest.json        stage, step, model config, data position, RNG, sha256 of every file
    <root>/<name>/model.safetensors    weights
    <root>/<name>/tokenizer.json
    <root>/<name>/optimizer.safetensors + state in the manifest (optional)
    <root>/<name>/<extra>.safetensors  any other tensors (value head, reference stats, ...)
    <root>/LATEST                      name of the newest complete checkpoint

A checkpoint is assembled in a hidden temp directory, every file fsynced, then renamed into place
(rename is atomic on POSIX), and only then ``LATEST`` is replaced (temp file + ``os.replace``).
A kill -9 at any moment leaves either the old or the new checkpoint, never a torn one. Loading
recomputes each file's sha256 and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "chatrl-checkpoint/1"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    pass


# --- optimizer state ⇄ flat tensors -----------------------------------------------------------------

def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- RNG --------------------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    py = random.getstate()
    return ({"rng.torch": torch.get_rng_state()},
            {"python": [py[0], list(py[1]), py[2]], "numpy": _np_state()})


def _np_state() -> dict:
    st = np.random.get_state()
    return {"name": st[0], "keys": st[1].tolist(), "pos": int(st[2]), "has_gauss": int(st[3]),
            "cached": float(st[4])}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if "python" in meta:
        v, inner, g = meta["python"]
        random.setstate((v, tuple(inner), g))
    if "numpy" in meta:
        n = meta["numpy"]
        np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached"]))


# --- save / load ------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    def tensors(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        f = self.path / f"{name}.safetensors"
        if not f.exists():
            raise CheckpointError(f"checkpoint {self.path} has no {name}.safetensors")
        return load_file(str(f), device=device)

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").exists()

    def model_state(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        return self.tensors("model", device)

    def optimizer_state(self) -> dict | None:
        if not self.has("optimizer"):
            return None
        return unflatten_optimizer(self.tensors("optimizer"), self.manifest["optimizer"])

    def restore_rng(self) -> None:
        set_rng_state(self.tensors("rng") if self.has("rng") else {}, self.manifest.get("rng", {}))


def save_checkpoint(root: Path, name: str, *, stage: str, step: int, model_state: dict[str, torch.Tensor],
                    model_config: dict, tokenizer_json: str | None = None, optimizer_state: dict | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    meta: dict[str, Any] | None = None, save_rng: bool = True,
                    update_latest: bool = True) -> Checkpoint:
    """Write a checkpoint atomically under ``root/name`` and point ``root/LATEST`` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    _restore_aside(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    manifest: dict[str, Any] = {"format": FORMAT, "stage": stage, "step": int(step), "model_config": model_config,
                                "created": time.time(), "meta": meta or {}, "files": {}}
    try:
        groups: dict[str, dict[str, torch.Tensor]] = {
            "model": {k: v.detach().contiguous().cpu() for k, v in model_state.items()}}
        if optimizer_state is not None:
            groups["optimizer"], manifest["optimizer"] = flatten_optimizer(optimizer_state)
        if save_rng:
            groups["rng"], manifest["rng"] = rng_state()
        for gname, ts in (extra_tensors or {}).items():
            groups[gname] = {k: v.detach().contiguous().cpu() for k, v in ts.items()}
        for gname, ts in groups.items():
            f = tmp / f"{gname}.safetensors"
            save_file(_untie(ts), str(f))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
        for f in sorted(tmp.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            manifest["files"][f.name] = sha256_file(f)
        manifest["sha256"] = manifest["files"]["model.safetensors"]
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # re-saving the same name: move the old one aside first
            old = root / f".{name}.old-{time.monotonic_ns()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if update_latest:
        atomic_write_text(root / "LATEST", name + "\n")
    return Checkpoint(final, manifest)


def _restore_aside(root: Path, name: str) -> None:
    """Re-saving a name moves the old directory aside (``.NAME.old-N``) and then the new one into place; a
    crash between those two renames leaves only the aside copy, a complete checkpoint. Put it back, so
    ``LATEST`` never names a directory that is missing; asides left next to a present checkpoint go."""
    aside = sorted(root.glob(f".{name}.old-*"), key=lambda d: int(d.name.rpartition("-")[2] or 0))
    if not aside:
        return
    if not (root / name).exists():
        os.rename(aside.pop(), root / name)
        fsync_dir(root)
    for d in aside:
        shutil.rmtree(d, ignore_errors=True)


def _untie(ts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): give each tensor its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in ts.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_checkpoint(path: Path, verify: bool = True) -> Checkpoint:
    """Open a checkpoint directory (or a root with ``LATEST``); verify every file's sha256."""
    path = Path(path)
    if not (path / "manifest.json").exists() and (path / "LATEST").exists():
        name = (path / "LATEST").read_text().strip()
        _restore_aside(path, name)
        path = path / name
    mf = path / "manifest.json"
    if not mf.exists():
        raise CheckpointError(f"no checkpoint at {path} (manifest.json missing)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mf}: invalid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: unknown format {manifest.get('format')!r}")
    if verify:
        for fname, digest in manifest["files"].items():
            f = path / fname
            if not f.exists():
                raise CheckpointError(f"checkpoint {path}: file {fname} missing")
            got = sha256_file(f)
            if got != digest:
                raise CheckpointError(f"checkpoint {path}: sha256 mismatch for {fname} "
                                      f"(manifest {digest[:12]}…, file {got[:12]}…)")
    return Checkpoint(path, manifest)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    root = Path(root)
    if not (root / "LATEST").exists():
        return None
    return load_checkpoint(root)


def list_checkpoints(root: Path) -> list[Checkpoint]:
    root = Path(root)
    out = []
    if not root.exists():
        return out
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / "manifest.json").exists():
            try:
                out.append(load_checkpoint(d, verify=False))
            except CheckpointError:
                continue
    return sorted(out, key=lambda c: c.manifest.get("created", 0))
