"""Validation reports: report.json (machine-readable) and report.md (human-readable), plus the console table."""

from __future__ import annotations

import json
import math
from pathlib import Path


def fmt_diff(r: dict) -> str:
    d = r["max_abs_diff"]
    if r["status"] == "error":
        return "ERROR"
    if d is None:
        return r["status"].upper()
    if isinstance(d, str):
        d = math.inf
    return f"{d:.2e} {r['status'].upper()}"


def table(report: dict) -> str:
    refs = report["references"]
    by = {(r["id"], r["reference"]): r for r in report["results"]}
    ids = sorted({r["id"] for r in report["results"]})
    names = {r["id"]: r["name"] for r in report["results"]}
    tols = {r["id"]: r["tolerance"] for r in report["results"]}
    head = ["#", "checkpoint", "tolerance"] + refs
    rows = [head]
    for i in ids:
        row = [str(i), names[i], f"{tols[i]:g}"]
        for ref in refs:
            r = by.get((i, ref))
            row.append(fmt_diff(r) if r else "-")
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    out = [f"# llorch-cpud validation report", ""]
    out.append(f"- model: `{report['model']}` ({report['family']})")
    out.append(f"- weights: {report['weights']}")
    out.append(f"- prompt: {report['prompt']!r} -> ids {report['prompt_ids']}")
    out.append(f"- greedy tokens compared: {report['n_tokens']}")
    out.append(f"- references: {', '.join(report['references'])}")
    for name, reason in report.get("skipped", {}).items():
        out.append(f"- skipped reference {name}: {reason}")
    out.append(f"- result: **{'PASS' if report['passed'] else 'FAIL'}**")
    out.append("")
    out.append("## Summary")
    out.append("")
    out.append("```")
    out.append(table(report))
    out.append("```")
    out.append("")
    out.append("## Details")
    out.append("")
    out.append("| # | checkpoint | reference | shape | max abs diff | tolerance | status | ours mean/std/min/max | ref mean/std/min/max | first values (ours / ref) | note |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")

    def s4(s):
        if not s or "mean" not in s or s["mean"] is None:
            return "-"
        extra = f" nan {s['nan']} inf {s['inf']}" if s["nan"] or s["inf"] else ""
        return f"{s['mean']:.4g} / {s['std']:.4g} / {s['min']:.4g} / {s['max']:.4g}{extra}"

    def first(s):
        return ", ".join(f"{x:.7g}" for x in s.get("first", [])[:3]) if s else ""

    for r in report["results"]:
        st = r.get("stats", {})
        o, f = st.get("ours", {}), st.get("reference", {})
        d = r["max_abs_diff"]
        d = d if isinstance(d, str) or d is None else f"{d:.3e}"
        out.append(
            f"| {r['id']} | {r['name']} | {r['reference']} | {r['shape']} | {d} | {r['tolerance']:g} | {r['status']} "
            f"| {s4(o)} | {s4(f)} | {first(o)} / {first(f)} | {r['note'].replace('|', '/')} |"
        )
    out.append("")
    out.append("## Versions")
    out.append("")
    for k, v in report["versions"].items():
        out.append(f"- {k}: {v}")
    return "\n".join(out) + "\n"


def write(report: dict, folder: Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    j, m = folder / "report.json", folder / "report.md"
    j.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m.write_text(markdown(report), encoding="utf-8")
    return j, m
