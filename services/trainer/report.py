"""The run report: a Markdown table per stage and round + PNG plots of the PPO iterations."""

from __future__ import annotations

from pathlib import Path

from chatrl.services.core.checkpoint import atomic_write_text
from chatrl.services.core.config import RunConfig
from chatrl.services.trainer.stages.common import run_dir

BASE_LABEL = "base (pre-trained)"  # the pipeline's label of the starting model's evaluation

PLOTS = [("reward", "RM score (train samples)"), ("gold_train", "gold score (train samples)"),
         ("kl", "KL to SFT per response (nats)"), ("beta", "KL coefficient β"),
         ("policy_loss", "policy loss"), ("value_loss", "value loss"), ("entropy", "entropy"),
         ("clipfrac", "clip fraction")]


def eval_table(evals: dict[str, dict]) -> str:
    lines = ["| policy | gold score (held-out) | RM score | KL to SFT | finished turns | words |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, e in evals.items():
        rm = f"{e['rm']:+.3f}" if "rm" in e else "–"
        lines.append(f"| {label} | {e['gold']:+.3f} ± {e['gold_se']:.3f} | {rm} | {e['kl']:.2f} | "
                     f"{e['finished']:.0%} | {e['length']:.1f} |")
    return "\n".join(lines)


def write_report(cfg: RunConfig, state: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir(cfg) / "report"
    out.mkdir(parents=True, exist_ok=True)
    hist = state.get("history", {})
    pngs = []
    if any(hist.values()):
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        for ax, (key, title) in zip(axes.flat, PLOTS):
            x0 = 0
            for name, rows in hist.items():
                ys = [r[key] for r in rows if key in r]
                if ys:
                    ax.plot(range(x0 + 1, x0 + len(ys) + 1), ys, marker=".", label=name)
                x0 += len(rows)
            ax.set_title(title)
            ax.set_xlabel("PPO iteration")
            ax.grid(alpha=0.3)
        if axes.flat[0].get_legend_handles_labels()[0]:  # a DPO round logs none of these curves
            axes.flat[0].legend()
        fig.tight_layout()
        fig.savefig(out / "ppo.png", dpi=80)
        plt.close(fig)
        pngs.append("ppo.png")
    times = state.get("times", {})
    model = (f"Model: `{cfg.model.path}` (a local Hugging Face model imported as the base)"
             + (f", LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}" if cfg.lora.enabled else "")
             + "." if cfg.model.path else "Model: chatrl's own GPT, pre-trained here.")
    md = [f"# chatrl run report — {cfg.name}", "", model, "",
          "Held-out prompts sampled at temperature 1 and scored by the *gold* simulated labeler (a stand-in "
          "for people, never shown to the reward model), the last round's reward model, and KL to the SFT "
          "(reference) model.", "", eval_table(state.get("evals", {})), "", "## Wall time per stage", "",
          "| stage | seconds |", "|---|---:|"]
    md += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    latency = {k: v for k, v in state.get("label_to_policy", {}).items() if v}
    if latency:  # from a ranking's submission to the first policy trained against an RM that used it
        md += ["", "## Label-to-policy latency", "", "| round | rankings | median s | max s |", "|---|---:|---:|---:|"]
        md += [f"| {k} | {v['labels']:.0f} | {v['label_to_policy_s_median']:.0f} | {v['label_to_policy_s_max']:.0f} |"
               for k, v in latency.items()]
    for name, rows in hist.items():
        if rows:
            last = rows[-1]
            md += ["", f"## {name}: last iteration", "",
                   ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, (int, float)))]
    md += [""] + [f"![{p}]({p})" for p in pngs]
    evals = state.get("evals", {})
    md += lift_lines(evals)
    md += before_after(evals)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def lift(after: dict, before: dict) -> tuple[float, float, str]:
    """gold(after) − gold(before) and its standard error: paired over the held-out prompts when both
    evaluations kept their per-prompt scores (every stage answers the same prompts with the same sampling
    seeds, so prompt difficulty cancels), else as two independent samples."""
    d = after["gold"] - before["gold"]
    a, b = after.get("gold_scores"), before.get("gold_scores")
    if a and b and len(a) == len(b) > 1:
        diffs = [x - y for x, y in zip(a, b)]
        mean = sum(diffs) / len(diffs)
        var = sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)
        return d, (var / len(diffs)) ** 0.5, "paired"
    return d, (after["gold_se"] ** 2 + before["gold_se"] ** 2) ** 0.5, "unpaired"


def lift_lines(evals: dict[str, dict]) -> list[str]:
    """gold(last round) − gold(SFT, where RLHF started) and − gold(the base model), in standard errors of the
    difference."""
    starts = [k for k in ("SFT", BASE_LABEL) if k in evals]
    last = next((k for k in reversed(list(evals)) if k not in starts), None)
    if last is None or not starts:
        return []
    out = [""]
    for k in starts:
        d, se, how = lift(evals[last], evals[k])
        out.append(f"Held-out gold, {last} − {k}: {d:+.3f} ({d / se if se else float('nan'):+.1f} standard errors "
                   f"of the {how} difference, n = {int(evals[last].get('n', 0))}).")
    return out


def before_after(evals: dict[str, dict], n: int = 5) -> list[str]:
    """The same held-out prompts (same sampling seeds) answered by every evaluated policy, side by side."""
    rows = [(k, e.get("samples", [])) for k, e in evals.items() if e.get("samples")]
    if not rows:
        return []

    def show(s: dict) -> str:
        return s["response"].replace("\n", " ").replace("|", "/") + ("" if s["finished"] else " […]")

    out = ["", "## Samples (held-out prompts, temperature 1; […] = the turn did not finish)", "",
           "| prompt | " + " | ".join(k for k, _ in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for per_stage in list(zip(*(s for _, s in rows)))[:n]:
        out.append(f"| {per_stage[0]['prompt']} | " + " | ".join(show(x) for x in per_stage) + " |")
    return out
