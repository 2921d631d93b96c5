"""The run report: a Markdown table per stage and round + PNG plots of the PPO iterations."""

from __future__ import annotations

from pathlib import Path

from chatrl.services.core.checkpoint import atomic_write_text
from chatrl.services.core.config import RunConfig
from chatrl.services.trainer.stages.common import run_dir

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


def lift_lines(evals: dict[str, dict]) -> list[str]:
    """gold(last PPO round) − gold(SFT, where PPO started), in standard errors of the difference."""
    start, last = evals.get("SFT"), next((evals[k] for k in reversed(list(evals)) if k.startswith("PPO")), None)
    if not start or not last:
        return []
    d = last["gold"] - start["gold"]
    se = (last["gold_se"] ** 2 + start["gold_se"] ** 2) ** 0.5
    return ["", f"Held-out gold, PPO − SFT: {d:+.3f} ({d / se if se else float('nan'):+.1f} standard errors "
                f"of the difference, n = {int(last.get('n', 0))} per row)."]


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
