"""Results → Markdown table + JSON (``bench/results/<date>.md`` / ``.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import Row

TITLES = {
    "generation": "1. Generation — policy-inference Generate (gRPC) vs HF transformers generate() (in-process)",
    "rl_iteration": "2. RL iteration — chatrl PPO (services + Ray) vs TRL",
    "weight_sync": "3. Weight sync — UpdateWeights vs in-memory copy vs safetensors on disk",
    "overhead": "4. Overhead — 1-token Generate over gRPC vs in-process",
    "training": "5. Training efficiency — pre-training throughput and fraction of measured matmul peak",
    "scaling": "6. Scaling — rollout samples/s with N Ray workers",
}


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    x = float(x)
    if x != x:
        return "nan"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def cell(s: dict) -> str:
    if not s or not s.get("n"):
        return "–"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]"


def rows_markdown(rows: list[Row | dict]) -> str:
    rows = [r.to_dict() if isinstance(r, Row) else r for r in rows]
    out = ["| case | unit | chatrl | peer | peer figure | ratio (>1 = chatrl faster) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = cell(r["ratio"]) if r["ratio"].get("n") else "–"
        if r["ratio"].get("n"):
            ratio = f"**{fmt(r['ratio']['median'])}×** [{fmt(r['ratio']['min'])}–{fmt(r['ratio']['max'])}]" \
                if r["ratio"]["n"] > 1 else f"**{fmt(r['ratio']['median'])}×**"
        out.append(f"| {r['case']} | {r['unit']} | {cell(r['chatrl'])} | {r['peer_name'] or '–'} | "
                   f"{cell(r['peer'])} | {ratio} |")
    return "\n".join(out)


def standalone(run) -> None:
    """``python -m bench.<name> [size]``: one benchmark at a size (default quick), table on stdout."""
    import sys

    from bench.common import SIZES, Workdir

    w = Workdir()
    try:
        out = run(SIZES[sys.argv[1] if len(sys.argv) > 1 else "quick"], w)
        rows, notes = out if isinstance(out, tuple) else (out, [])
        print_rows(rows)
        print("\n".join(notes))
    finally:
        w.close()


def print_rows(rows: list[Row]) -> None:
    print(rows_markdown(rows))
    for r in rows:
        if r.extra:
            print(f"  {r.case} / {r.peer_name}: {r.extra}")


def write(results: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{stem}.json"
    md = out_dir / f"{stem}.md"
    js.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md.write_text(markdown(results))
    return md, js


def markdown(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    lines = [f"# chatrl benchmarks — {res['date']} ({res['size']})", "",
             "Each figure: median [min–max] over interleaved repeats (chatrl and its peer alternate in the same "
             "run). Ratios are per repeat pair, > 1 means chatrl is faster. Reproduce: `make bench` "
             f"(`python -m bench.run{' --quick' if res['size'] == 'quick' else ''}`).", "",
             "**Machine:** " + ", ".join(f"{k} {m[k]}" for k in m), "",
             "**Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items() if val), "",
             f"Total wall time: {res['seconds']:.0f} s.", ""]
    for name, b in res["benchmarks"].items():
        lines += [f"## {TITLES.get(name, name)}", ""]
        if b.get("skipped"):
            lines += [f"_Skipped: {b['skipped']}_", ""]
            continue
        if b.get("error"):
            lines += [f"_Failed: {b['error']}_", ""]
        if b.get("rows"):
            lines += [rows_markdown(b["rows"]), ""]
        for r in b.get("rows", []):
            if r.get("extra"):
                lines.append(f"- {r['case']} vs {r['peer_name'] or '—'}: "
                             + ", ".join(f"{k} = {fmt(x) if isinstance(x, (int, float)) else x}"
                                         for k, x in r["extra"].items()))
        for note in b.get("notes", []):
            lines.append(f"- {note}")
        lines.append(f"- ({b.get('seconds', 0):.0f} s)")
        lines.append("")
    return "\n".join(lines)
