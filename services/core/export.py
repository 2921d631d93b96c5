"""Export a chatrl checkpoint of a Hugging Face model as a plain HF directory that needs no chatrl code.

- a policy (SFT / PPO): ``config.json`` + ``model.safetensors`` (LoRA adapters merged into the weights),
  ``generation_config.json`` (stops at the end-of-turn token), the tokenizer with its chat template —
  ``AutoModelForCausalLM.from_pretrained(out)`` + ``AutoTokenizer.from_pretrained(out)`` load it;
- a reward model: the same backbone directory, plus ``scalar_head.safetensors`` (``weight`` [1, d],
  ``bias`` [1]) and ``reward_head.json`` saying how to apply it. chatrl's reward-scoring service serves
  such a directory as is (it reads ``scalar_head.safetensors`` next to the HF weights).

The directory is written under a temp name and renamed, so a crash leaves no half export; an existing
target is refused (never overwritten).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from chatrl.services.core.build import architecture, model_from_checkpoint, tokenizer_from_checkpoint
from chatrl.services.core.checkpoint import fsync_dir, load_checkpoint

REWARD_HEAD_JSON = "reward_head.json"
HEAD_FILE = "scalar_head.safetensors"
REWARD_STAGES = ("reward", "reward_model")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, kind: str = "auto") -> Path:
    """Write ``checkpoint`` (a chatrl checkpoint directory, or a stage directory with LATEST) to ``out_dir``
    as a plain HF directory. ``kind``: "policy", "reward", or "auto" (reward for a reward-model stage)."""
    out = Path(out_dir)
    if out.exists():  # checked first: nothing is loaded for a target we would refuse anyway
        raise FileExistsError(f"export target {out} already exists; choose a new directory or remove it")
    if kind not in ("auto", "policy", "reward"):
        raise ValueError(f"kind must be 'auto', 'policy' or 'reward', got {kind!r}")
    ck = load_checkpoint(Path(checkpoint))
    arch = architecture(ck.manifest["model_config"])
    if arch != "hf":
        raise ValueError(f"checkpoint {ck.path} holds chatrl's own GPT (architecture {arch!r}), which has no "
                         f"Hugging Face equivalent to export to; export needs a run that started from a local "
                         f"HF model directory")
    if kind == "auto":
        kind = "reward" if ck.stage in REWARD_STAGES else "policy"
    reward = kind == "reward"
    state_keys = ck.model_state().keys()
    if reward and "scalar_head.weight" not in state_keys:
        raise ValueError(f"checkpoint {ck.path} (stage {ck.stage!r}) has no scalar head: not a reward model")

    from chatrl.services.core.lora import merge_lora

    model = merge_lora(model_from_checkpoint(ck, scalar_head=reward)).eval()
    tok = tokenizer_from_checkpoint(ck)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        hf = model.hf
        gen = getattr(hf, "generation_config", None)
        if gen is not None:  # plain generate() stops where a chatrl turn ends
            gen.eos_token_id = sorted({tok.end_id, tok.eot_id})
            gen.pad_token_id = tok.pad_id
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tok.save(tmp)
        provenance = {"format": "chatrl-export/1", "kind": kind, "checkpoint": str(ck.path), "stage": ck.stage,
                      "step": ck.step, "weights_sha256": ck.sha256,
                      "lora_merged": bool(ck.manifest["model_config"].get("lora"))}
        (tmp / "chatrl_export.json").write_text(json.dumps(provenance, indent=1))
        if reward:
            from safetensors.torch import save_file

            head = model.scalar_head
            save_file({"weight": head.weight.detach().contiguous().cpu(),
                       "bias": head.bias.detach().contiguous().cpu()}, str(tmp / HEAD_FILE))
            (tmp / REWARD_HEAD_JSON).write_text(json.dumps(reward_head_recipe(model.cfg.d_model, tok), indent=1))
        fsync_dir(tmp)
        os.rename(tmp, out)  # fails if someone created ``out`` meanwhile: never overwrite
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def reward_head_recipe(d_model: int, tok) -> dict:
    return {
        "file": HEAD_FILE,
        "reward": "weight @ h + bias",
        "h": "the final hidden state (after the last norm: hidden_states[-1] of AutoModelForCausalLM with "
             "output_hidden_states=True) at the last token of the conversation",
        "input": "token ids of the prompt rendered with the tokenizer's chat template "
                 "(apply_chat_template(messages, add_generation_prompt=True)), then the response's tokens, "
                 "then the end-of-turn token if the response finished; nothing after it, no padding",
        "end_of_turn_token": tok.hf.convert_ids_to_tokens(tok.end_id),
        "hidden_size": d_model,
        "weight_shape": [1, d_model],
    }
