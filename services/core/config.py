"""Run configuration: one YAML file per run, loaded into dataclasses; unknown or mistyped fields are
errors that name the field (``pretrain.stepz``); any field can be overridden from the CLI with
``--set section.field=value`` (the value is parsed as YAML).

Every field is documented next to its definition below and in ``configs/tiny.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chatrl.services.core.lora import LoraConfig
from chatrl.services.core.model import GPTConfig, resolve_dtype


@dataclass
class ModelConfig(GPTConfig):
    """``model:`` — chatrl's own GPT (the fields of :class:`GPTConfig`, trained from scratch), or, with
    ``path``, a local Hugging Face causal LM that every stage starts from (the GPT fields are then unused)."""
    path: str = ""  # a local HF model directory (AutoModelForCausalLM + tokenizer with a chat template);
    #                 never a hub name. Set: pre-training imports it as the base checkpoint instead of training

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)})


@dataclass
class TokenizerConfig:
    vocab_size: int = 3072  # BPE vocabulary size, special tokens included
    path: str = ""  # an existing tokenizer.json to use instead of training one


@dataclass
class DataConfig:
    cache_dir: str = ".cache/chatrl/data"  # where `chatrl data fetch` caches and builds the default data
    pretrain_files: list[str] = field(default_factory=list)  # text corpora; empty = the built default
    sft_file: str = ""  # SFT demonstrations JSONL; empty = the built default
    prompts_file: str = ""  # RLHF training prompts; empty = the built default
    eval_prompts_file: str = ""  # held-out evaluation prompts; empty = the built default
    rankings_file: str = ""  # human rankings JSONL; empty = have the simulated labeler rank samples
    pairs_file: str = ""  # extra pairwise preferences JSONL for the reward model (optional)
    gold_file: str = ""  # simulated labeler parameters; empty = the built default (if data is default)


@dataclass
class PretrainConfig:
    steps: int = 600  # optimizer steps
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 25  # steps between metric reports
    ckpt_every: int = 200  # steps between checkpoints (one is always written at the end)


@dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int = 192  # conversations are truncated to this many tokens
    log_every: int = 25
    ckpt_every: int = 200


@dataclass
class RewardConfig:
    num_prompts: int = 400  # prompts whose samples the (simulated) labelers rank
    k: int = 4  # responses ranked per prompt (K); each ranking gives C(K,2) pairs
    label_noise: float = 0.5  # simulated labelers' disagreement (Gumbel scale on gold scores)
    temperature: float = 1.0  # sampling temperature of the responses to rank
    max_new_tokens: int = 48
    epochs: int = 2  # passes over the rankings
    batch_size: int = 8  # prompts (each with K responses) per step
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_fraction: float = 0.1  # rankings held out to measure pairwise accuracy
    log_every: int = 10
    # which prompts get comparison tasks (services/trainer/active.py): off = at random; margin = those whose
    # sampled responses the current reward model scores closest together; ensemble = those on which an
    # ensemble of reward models disagrees most. Needs a reward model (rounds after the first).
    active_selection: str = "off"
    # what round r's reward model learns from: all = every round's rankings so far (InstructGPT: a new RM on
    # all comparisons collected); latest = only round r's fresh rankings of the current policy
    train_on: str = "all"


RL_ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")
PIPELINE_METHODS = ("rl", "dpo")


@dataclass
class PPOConfig:
    """The RL round (section name kept from when PPO was the only algorithm)."""

    # ppo: value model + GAE. The critic-free ones build no value model and take their baseline from the
    # samples_per_prompt (≥ 2) responses of each prompt: grpo (group mean and std), rloo (mean of the
    # other responses), reinforce_pp (REINFORCE++ with baseline: group mean, then whitened over the batch)
    algorithm: str = "ppo"
    # reward: −β·KL on every response token of the reward (InstructGPT); loss: β·KL (kl_estimator, k3 is
    # GRPO's) added to the policy loss. PPO supports reward only (its critic learns the shaped reward).
    kl_mode: str = "reward"
    # how the per-token policy loss is averaged: token = over every response token of the minibatch
    # (each token weighs the same — a long response is not diluted, no length bias; DAPO / Dr. GRPO);
    # sequence = per response first, then over responses (the GRPO paper; biased towards short correct
    # and long wrong answers). token is the default: it is also what PPO used all along.
    loss_norm: str = "token"
    iterations: int = 20  # RL iterations per round (rollout → update → weight push)
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 2  # n completions per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature (logprobs are of softmax(logits / temperature))
    epochs: int = 2  # PPO epochs over each batch of experience
    minibatch_size: int = 16
    lr: float = 2e-5  # policy learning rate
    value_lr: float = 1e-4  # value-model learning rate
    clip_eps: float = 0.2  # policy ratio clip ε
    value_clip: float = 0.5  # value clip, in reward units
    gamma: float = 1.0
    lam: float = 0.95  # GAE λ
    init_kl_coef: float = 0.1  # β; 0 = no KL penalty (the reward-hacking ablation)
    adaptive_kl: bool = True  # Ziegler et al. adaptive β
    kl_target: float = 4.0  # target KL per response (nats, summed over tokens)
    kl_horizon: float = 2000.0
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pre-training loss mixed into the policy update
    whiten_advantages: bool = True
    reward_clip: float = 5.0  # RM scores are clipped to ±this
    grad_clip: float = 1.0
    old_logprobs: str = "recompute"  # recompute | service (behaviour logprobs from policy-inference)
    max_staleness: int = 0  # drop samples from policies more than this many versions old
    async_rollout: bool = False  # overlap the next rollout with the current update (needs max_staleness ≥ 1)
    num_workers: int = 2  # Ray rollout workers
    worker_num_cpus: float = 0.5  # Ray resources per worker
    worker_num_gpus: float = 0.0
    ckpt_every: int = 5  # iterations between checkpoints (one is always written at the end)
    # the PPO stage on its own (StartRun STAGE_PPO / the ppo stage): the SFT checkpoint the policy (and the
    # reference) start from, and the reward-model checkpoint that scores and initialises the value model;
    # empty = this run's own sft / reward stage. The pipeline ignores both (it uses its own stages).
    policy_init: str = ""
    reward_model: str = ""
    # the logprob consistency gate: alert (log line, the k8s rule) when the trainer's recomputed logprobs of
    # samples drawn by the same weights differ from policy-inference's by more than this (nats, max |Δ|)
    logprob_gate_threshold: float = 1e-4
    # rows of each batch the gate re-runs in fp32 when the trainer computes in bf16 (an extra forward per
    # iteration; the first rows of the same version are as good a sample as any); 0 = every row
    logprob_gate_rows: int = 16


@dataclass
class DPOConfig:
    """pipeline.method: dpo — Direct Preference Optimisation on every pair of each round's K-way rankings,
    against the frozen reference (the SFT model), instead of reward model + RL."""

    beta: float = 0.1  # β: strength of the implicit KL constraint to the reference (> 0)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo (Azar et al.: squared loss towards margin 1/(2β))
    label_smoothing: float = 0.0  # ε ∈ [0, 0.5): the assumed probability a ranked pair is flipped
    reference: str = ""  # the reference checkpoint for a standalone DPO stage; empty = this run's sft stage
    epochs: int = 2  # passes over the pairs
    batch_size: int = 16  # pairs per step
    lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_fraction: float = 0.1  # rankings (all their pairs) held out for the preference accuracy
    log_every: int = 10


@dataclass
class PipelineConfig:
    rounds: int = 1  # (comparisons from the current policy → RM → RL, or → DPO) × rounds
    method: str = "rl"  # rl: reward model + ppo.algorithm each round | dpo: DPO on the rankings (no RM)
    eval_prompts: int = 200  # held-out prompts scored by the gold labeler per stage
    # the services of a pipeline or PPO run. start_services: whoever starts the run (the trainer service,
    # `chatrl pipeline run`) launches policy/reward/reference/feedback as local processes on free loopback
    # ports, with no models, and stops them after; false: dial the running ones at the addresses in
    # `services` (+ service_overrides), e.g. Kubernetes Service names. Either way the run seeds them.
    services: str = "configs/services.yaml"
    start_services: bool = True
    reuse_from: str = ""  # another run dir whose pre-training, SFT and round-0 labels/RM this run starts from
    labelers: int = 2  # simulated labelers labelling through the feedback service; 0 = wait for people
    service_overrides: list[str] = field(default_factory=list)  # e.g. ["policy.max_batch_size=64"]
    # per model service (policy / reward / reference), a DNS name that lists every replica, ready or not
    # (a Kubernetes headless Service with publishNotReadyAddresses): weight pushes and LoadModel go to each.
    # Unset: the service's own host. Rollouts use the service's host (ready replicas, round-robin).
    replica_hosts: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "tiny"
    run_dir: str = "runs/tiny"  # checkpoints, data, logs and the report go here
    seed: int = 1234
    device: str = "cpu"  # "cpu" or "cuda[:N]" — the same config scales without code changes
    # compute dtype under autocast: fp32 | bf16 (fp16 only on GPU) | auto (bf16 where the device has native bf16
    # matmuls, else fp32 — resolved when the config is loaded)
    dtype: str = "bf16"
    threads: int = 2  # torch threads of the training process (keep ≤ cores)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters for SFT, RM and PPO (HF models only)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)
        validate_methods(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def validate_methods(cfg: RunConfig) -> None:
    """The RL algorithm and DPO settings, checked when the config is built (before any work starts)."""
    pc, dc = cfg.ppo, cfg.dpo
    if pc.algorithm not in RL_ALGORITHMS:
        raise ValueError(f"ppo.algorithm: unknown algorithm {pc.algorithm!r} (one of {', '.join(RL_ALGORITHMS)})")
    if pc.algorithm != "ppo" and pc.samples_per_prompt < 2:
        raise ValueError(f"ppo.samples_per_prompt must be >= 2 for ppo.algorithm {pc.algorithm} (its baseline "
                         f"is the other responses to the same prompt), got {pc.samples_per_prompt}")
    if pc.kl_mode not in ("reward", "loss"):
        raise ValueError(f"ppo.kl_mode must be reward or loss, got {pc.kl_mode!r}")
    if pc.algorithm == "ppo" and pc.kl_mode == "loss":
        raise ValueError("ppo.kl_mode: loss needs a critic-free ppo.algorithm (PPO's value model learns the "
                         "KL-shaped reward)")
    if pc.kl_mode == "loss" and pc.kl_estimator == "k1":
        raise ValueError("ppo.kl_estimator: k1 as a loss term has zero expected gradient; use k3 (GRPO) or k2 "
                         "with ppo.kl_mode: loss")
    if pc.loss_norm not in ("token", "sequence"):
        raise ValueError(f"ppo.loss_norm must be token or sequence, got {pc.loss_norm!r}")
    if pc.logprob_gate_rows < 0:
        raise ValueError(f"ppo.logprob_gate_rows must be >= 0 (0 = every row), got {pc.logprob_gate_rows}")
    if pc.kl_estimator not in ("k1", "k2", "k3", "abs"):
        raise ValueError(f"ppo.kl_estimator must be one of k1, k2, k3, abs, got {pc.kl_estimator!r}")
    if cfg.reward.train_on not in ("all", "latest"):
        raise ValueError(f"reward.train_on must be all or latest, got {cfg.reward.train_on!r}")
    if cfg.reward.active_selection not in ("off", "margin", "ensemble"):
        raise ValueError(f"reward.active_selection must be off, margin or ensemble, got {cfg.reward.active_selection!r}")
    if cfg.pipeline.method not in PIPELINE_METHODS:
        raise ValueError(f"pipeline.method: unknown method {cfg.pipeline.method!r} (one of {', '.join(PIPELINE_METHODS)})")
    if not dc.beta > 0:
        raise ValueError(f"dpo.beta must be > 0, got {dc.beta}")
    if dc.loss not in ("sigmoid", "ipo"):
        raise ValueError(f"dpo.loss must be sigmoid or ipo, got {dc.loss!r}")
    if not 0.0 <= dc.label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {dc.label_smoothing}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(kt, k, f"{where} key"): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, d: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config field {(where + '.' if where else '') + unknown[0]}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.field=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        cur = d
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        cur[parts[-1]] = yaml.safe_load(raw)
    return d


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path, depth: int = 0) -> dict:
    """A config file; ``base: other.yaml`` (relative to this file) inherits and deep-merges another."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if "base" in d:
        if depth > 8:
            raise ConfigError(f"{path}: 'base' chain too deep")
        d = _merge(read_yaml(path.parent / str(d.pop("base")), depth + 1), d)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    d = read_yaml(Path(path)) if path else {}
    d = apply_overrides(d, overrides or [])
    return from_dict(RunConfig, d)


def config_from_yaml_text(text: str, overrides: list[str] | None = None) -> RunConfig:
    d = yaml.safe_load(text) or {}
    if not isinstance(d, dict):
        raise ConfigError("config: top level must be a mapping")
    return from_dict(RunConfig, apply_overrides(d, overrides or []))
