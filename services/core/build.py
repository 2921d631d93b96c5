"""Models and tokenizers from what a chatrl checkpoint records, whatever the architecture.

A checkpoint's manifest carries ``model_config``: ``GPTConfig.to_dict()`` for chatrl's own GPT, or
``HFConfig.to_dict()`` (``architecture: "hf"`` + the transformers config as JSON, + ``lora`` when adapters
are injected) for a Hugging Face model. Its ``tokenizer.json`` is the tokenizer as one document
(``ChatTokenizer.to_str()`` or ``HFChatTokenizer.to_str()``). Both rebuild with no access to the directory
the model first came from. Every stage, service and the exporter build models through here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from chatrl.services.core.checkpoint import Checkpoint, load_checkpoint
from chatrl.services.core.model import GPT, GPTConfig
from chatrl.services.core.tokenizer import ChatTokenizer


def architecture(model_config: dict) -> str:
    return str(model_config.get("architecture", "gpt"))


def build_model(model_config: dict, scalar_head: bool = False, device: str = "cpu",
                dtype: torch.dtype | str | None = None) -> nn.Module:
    """A GPT or an :class:`~chatrl.services.core.hf.HFCausalLM` shaped by ``model_config`` (weights not
    loaded; HF weights uninitialised). ``dtype`` applies to HF models (default fp32); GPT stays fp32 and
    trains under autocast."""
    arch = architecture(model_config)
    if arch == "hf":
        from chatrl.services.core.hf import build_hf_model

        return build_hf_model(model_config, scalar_head=scalar_head, device=device,
                              dtype=dtype if dtype is not None else torch.float32)
    if arch != "gpt":
        raise ValueError(f"model_config.architecture must be 'gpt' or 'hf', got {arch!r}")
    return GPT(GPTConfig.from_dict({k: v for k, v in model_config.items() if k != "architecture"}),
               scalar_head=scalar_head).to(device)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Load ``state`` strictly, except: a scalar head absent from ``state`` keeps its fresh initialisation
    (a reward model / value head starts from SFT weights), one present but unwanted is dropped, and a
    tied output embedding may be absent."""
    if getattr(model, "scalar_head", None) is None:
        state = {k: v for k, v in state.items() if not k.startswith("scalar_head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("scalar_head.") and m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return model


def model_from_checkpoint(ckpt: Checkpoint, scalar_head: bool = False, device: str = "cpu",
                          dtype: torch.dtype | str | None = None) -> nn.Module:
    """The checkpoint's model (GPT or HF, with its LoRA adapters if it was trained with them)."""
    model = build_model(ckpt.manifest["model_config"], scalar_head=scalar_head, device="cpu", dtype=dtype)
    state = ckpt.model_state()
    if dtype is not None and architecture(ckpt.manifest["model_config"]) == "hf":
        p = next(model.parameters())
        state = {k: v.to(p.dtype) if v.is_floating_point() else v for k, v in state.items()}
    return load_model_state(model, state, f"checkpoint {ckpt.path}").to(device)


def tokenizer_from_checkpoint(ckpt: Checkpoint):
    """ChatTokenizer or HFChatTokenizer, as the checkpoint's ``tokenizer.json`` says."""
    f = ckpt.path / "tokenizer.json"
    if not f.is_file():
        raise ValueError(f"checkpoint {ckpt.path} has no tokenizer.json")
    if architecture(ckpt.manifest["model_config"]) == "hf":
        from chatrl.services.core.hf import HFChatTokenizer

        return HFChatTokenizer.from_str(f.read_text())
    return ChatTokenizer.load(f)


def open_model(path: str | Path, scalar_head: bool = False, device: str = "cpu",
               dtype: torch.dtype | str | None = None):
    """(model, tokenizer) from a local HF model directory or a chatrl checkpoint (a checkpoint directory
    or a stage directory with LATEST) — what a run's starting point (``model.path`` / ``--init``) names."""
    from chatrl.services.core.hf import is_hf_dir, load_hf

    p = Path(str(path).removeprefix("file://"))
    if is_hf_dir(p):
        return load_hf(p, scalar_head=scalar_head, device=device,
                       dtype=dtype if dtype is not None else torch.float32)
    ck = load_checkpoint(p)
    return model_from_checkpoint(ck, scalar_head, device, dtype), tokenizer_from_checkpoint(ck)
