"""LoRA adapters (Hu et al., 2021) on an :class:`~chatrl.services.core.hf.HFCausalLM`, through ``peft``.

A frozen weight ``W`` [out, in] gains a trainable low-rank update: ``h = W x + (alpha / r) · B A x`` with
``A`` [r, in] (random) and ``B`` [out, r] (zeros, so training starts from the base model exactly). Only
``A``, ``B`` (and a scalar head, if any) train, which is what makes a 135M model's SFT / RM / PPO fit a
CPU budget, and a weight push small: the adapter is ~1–2 % of the full state dict.

The adapters are injected into the wrapped transformers model in place (``peft.inject_adapter_in_model``,
no ``PeftModel`` wrapper), so :class:`HFCausalLM`'s forward, KV cache and heads are unchanged. State-dict
keys of a wrapped layer become ``…q_proj.base_layer.weight`` + ``…q_proj.lora_A.default.weight`` /
``…lora_B.default.weight``; the model's ``cfg.lora`` records the config, so a checkpoint's manifest
rebuilds the same structure (:func:`chatrl.services.core.hf.build_hf_model`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

ALL_LINEAR = "all-linear"  # every linear layer except the output (LM) head — peft's own shorthand
_ADAPTER = "default"


@dataclass
class LoraConfig:
    """LoRA settings of a run (a ``lora:`` section of the run config)."""
    enabled: bool = False  # train LoRA adapters instead of every weight (base weights frozen)
    r: int = 8  # rank of each update B·A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input while training; 0 keeps PPO's old/new logprobs
    #                       computed by the same function (the inference side never applies dropout)
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])  # module names (suffixes such
    #   as "q_proj", "v_proj") or ["all-linear"]; a name no module has is an error before any training
    top_layers: int = 0  # adapters in the last N decoder layers only (0 = every layer): the layers below stay
    #   frozen and backward stops above them — about a third off the cost of a training step at N = half

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"lora.target_modules must be a non-empty list of module names, "
                             f"got {self.target_modules!r}")
        if not isinstance(self.top_layers, int) or self.top_layers < 0:
            raise ValueError(f"lora.top_layers must be an integer >= 0 (0 = every layer), got {self.top_layers!r}")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"lora.target_modules: {ALL_LINEAR!r} stands alone, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown lora field(s): {sorted(unknown)}")
        return cls(**d)

    def to_peft(self, hf_model: nn.Module, n_layers: int):
        import peft

        targets = ALL_LINEAR if self.target_modules == [ALL_LINEAR] else list(self.target_modules)
        layers = list(range(n_layers - self.top_layers, n_layers)) if self.top_layers else None
        if layers and targets == ALL_LINEAR:  # peft takes a layer subset only with named targets: name them all
            head = {n for n, m in hf_model.named_modules() if m is hf_model.get_output_embeddings()}
            targets = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(hf_model) if n not in head})
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=targets, bias="none", layers_to_transform=layers)


def _is_linear(m: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and _is_linear(m)]


def _skeleton(hf_config: dict) -> nn.Module:
    """The transformers model of a config.json dict on the meta device: module names, no memory."""
    from transformers import AutoModelForCausalLM

    from chatrl.services.core.hf import hf_config_from_dict

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config_from_dict(hf_config))


def check_lora_targets(model_or_config: nn.Module | dict, cfg: LoraConfig,
                       field: str = "lora.target_modules") -> None:
    """Each target must name at least one linear layer (peft matches a name or a ``.``-suffix of one).
    Given a config.json dict, the check builds the model on the meta device: no weights, milliseconds."""
    if cfg.top_layers:
        c = model_or_config if isinstance(model_or_config, dict) else model_or_config.config.to_dict()
        c = c.get("text_config") or c
        n = c.get("num_hidden_layers") or c.get("n_layer")
        if n is not None and cfg.top_layers > n:
            raise ValueError(f"lora.top_layers: {cfg.top_layers} is more than the model's {n} decoder layers")
    if cfg.target_modules == [ALL_LINEAR]:
        return
    model = _skeleton(model_or_config) if isinstance(model_or_config, dict) else model_or_config
    names = linear_module_names(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    for t in cfg.target_modules:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"{field}: no linear layer named {t!r} in this model; its linear layers are "
                             f"{leaves}")


def apply_lora(model, cfg: LoraConfig):
    """Inject LoRA adapters into ``model.hf`` in place; freeze every base weight (a scalar head stays
    trainable: a reward model or value head is trained whole). Returns ``model``."""
    import peft

    if is_lora(model):
        raise ValueError("the model already carries LoRA adapters")
    check_lora_targets(model.hf, cfg)
    peft.inject_adapter_in_model(cfg.to_peft(model.hf, model.cfg.n_layer), model.hf, adapter_name=_ADAPTER)
    for n, p in model.named_parameters():
        p.requires_grad_(_is_adapter_key(n) or n.startswith("scalar_head."))
    model.cfg.lora = cfg.to_dict()
    return model


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_lora(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "cfg", None), "lora", None))


def _is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_adapter_state(state: dict) -> bool:
    """Whether a state dict holds LoRA adapter weights only (what :func:`adapter_state_dict` returns)."""
    return bool(state) and all(_is_adapter_key(k) for k in state)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (``…lora_A.default.weight`` / ``…lora_B.default.weight``): what a weight
    push carries for a LoRA policy — the receiver holds the same base weights."""
    if not is_lora(model):
        raise ValueError("the model has no LoRA adapters (lora.enabled is false)")
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k)}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (from :func:`adapter_state_dict` of a model with the same LoRA config) into
    ``model``; exactly the adapter's keys and shapes, else a ValueError naming the first mismatch."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the model's LoRA config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"adapter weights[{k!r}] has shape {list(t.shape)}, the model expects "
                             f"{list(own[k].shape)}")
    with torch.no_grad():
        for k, t in state.items():
            own[k].copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + (alpha/r)·B·A) and remove the adapters, in place:
    the model is a plain one again (what export writes and what inference runs fastest)."""
    if not is_lora(model):
        return model
    for name, layer in _lora_layers(model):
        layer.merge(adapter_names=[_ADAPTER])
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    model.cfg.lora = None
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (adapter-free) copy of ``model`` with the adapters folded in; ``model`` is unchanged."""
    return merge_lora(copy.deepcopy(model))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def share_frozen_weights(model: nn.Module, source: nn.Module) -> int:
    """Point ``model``'s frozen parameters at ``source``'s same-named ones wherever they hold equal values —
    PPO's LoRA value model and policy sit on one base (the SFT checkpoint's), so the trainer keeps one copy of
    it instead of two. Trainable parameters (adapters, the scalar head) stay ``model``'s own. Returns the
    bytes no longer held twice."""
    theirs = dict(source.named_parameters(remove_duplicate=False))
    swap: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        q = theirs.get(name)
        if (q is None or p is q or id(p) in swap or p.requires_grad or q.requires_grad or p.shape != q.shape
                or p.dtype != q.dtype or p.device != q.device or not torch.equal(p, q)):
            continue
        swap[id(p)] = q
    saved = {}
    for mod in model.modules():
        for leaf, p in list(mod._parameters.items()):  # a tied weight appears under several modules
            if p is not None and id(p) in swap:
                saved[id(p)] = p.numel() * p.element_size()
                mod._parameters[leaf] = swap[id(p)]
    return sum(saved.values())
