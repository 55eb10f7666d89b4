"""Validation reports: report.json (machine-readable) and report.md (human-readable), plus the console table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llorch_cpud.validate.checkpoints import tol_text


def fmt_diff(r: dict) -> str:
    d = r["max_abs_diff"]
    if r["status"] == "error":
        return "ERROR"
    if d is None:
        return r["status"].upper()
    if isinstance(d, str):
        d = math.inf
    return f"{d:.2e} {r['status'].upper()}"


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def footnotes(report: dict) -> list[str]:
    """Per reference: checkpoints not compared (N/A) and why, a declared tolerance that replaces SPEC's, and how
    its own tokenizer encodes the prompt. Empty for references that compare everything at SPEC tolerances."""
    out = []
    if report.get("numerics", "float32") != "float32":
        tols = ", ".join(f"{k}: {v:g}" for k, v in report.get("numerics_tolerances", {}).items())
        out.append(f"numerics {report['numerics']}: activations quantized to 8 bits per block in the quantized products; "
                   f"tolerances replaced at checkpoints {tols} against every reference (SPEC's elsewhere)")
    notes = report.get("reference_notes", {})
    for ref in report["references"]:
        n = notes.get(ref, {})
        mine = [r for r in report["results"] if r["reference"] == ref]
        na = [r for r in mine if r["status"] == "n/a"]
        if na:
            why = n.get("unavailable_reason") or na[0]["note"].removeprefix("n/a: ")
            out.append(f"{ref}: N/A at checkpoints {_ranges([r['id'] for r in na])} (not compared, not a failure): {why}")
        for r in mine:  # where argmax or the greedy paths part: the step and the logit gap
            if r["id"] in (10, 12) and r["status"] in ("tie", "fail"):
                out.append(f"{ref}: checkpoint {r['id']} {r['status'].upper()}: {r['note']}")
        if n.get("tolerances"):
            spec = n.get("spec_tolerances", {})
            tols = ", ".join(f"checkpoint {k}: {v:g}" + (f" instead of SPEC {tol_text(spec[k])}" if k in spec else "")
                             for k, v in n["tolerances"].items())
            out.append(f"{ref}: declared tolerance {tols} ({n.get('tolerance_reason', '')}); also the vs-reference part "
                       f"of 9 and the tie threshold of 10 and 12")
        if n.get("tokenization"):
            out.append(f"{ref}: tokenization: {n['tokenization']}")
    return out


def table(report: dict, notes: bool = True) -> str:
    refs = report["references"]
    by = {(r["id"], r["reference"]): r for r in report["results"]}
    ids = sorted({r["id"] for r in report["results"]})
    names = {r["id"]: r["name"] for r in report["results"]}
    tols: dict = {}  # the column shows the strictest (SPEC's); a reference's declared tolerance is shown in its cell
    for r in report["results"]:
        tols[r["id"]] = min(tols.get(r["id"], r["tolerance"]), r["tolerance"])
    head = ["#", "checkpoint", "tolerance"] + refs
    rows = [head]
    for i in ids:
        row = [str(i), names[i], f"{tols[i]:g}"]
        for ref in refs:
            r = by.get((i, ref))
            cell = fmt_diff(r) if r else "-"
            if r and r["tolerance"] != tols[i]:
                cell += f" (tol {r['tolerance']:g})"
            row.append(cell)
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + (footnotes(report) if notes else []))


def _v(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)):
        return " ".join(str(t) for t in x[:3]) + (" ..." if len(x) > 3 else "")
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.8g}"


def comparison_rows(report: dict, cid: int) -> list[list[str]]:
    """The seed's comparison table for one checkpoint: one column for ours, one per reference.

    For stage checkpoints ours is fed each reference's own inputs, so its column shows the run
    against the first reference (the others differ only by the references' input differences)."""
    refs = report["references"]
    by = {r["reference"]: r for r in report["results"] if r["id"] == cid}
    refs = [n for n in refs if n in by]
    if not refs:
        return []
    first = by[refs[0]]
    cols = [first.get("stats", {}).get("ours", {})] + [by[n].get("stats", {}).get("reference", {}) for n in refs]
    rows = [["", "llorch-cpud"] + refs]
    if any("mean" in c for c in cols):
        rows.append(["first value"] + [_v(c.get("first", [None])[0]) if c.get("first") else "-" for c in cols])
        for key in ("mean", "std"):
            rows.append([key] + [_v(c.get(key)) for c in cols])
    if any("token" in c for c in cols):
        rows.append(["token"] + [_v(c.get("token")) for c in cols])
    if any("tokens" in c for c in cols):
        rows.append(["tokens"] + [_v(c.get("tokens")) for c in cols])
    rows.append(["max abs diff", "-"] + [fmt_diff(by[n]).split(" ")[0] for n in refs])
    if len({by[n]["tolerance"] for n in refs}) > 1:  # a reference with a declared tolerance profile
        rows.append(["tolerance", "-"] + [f"{by[n]['tolerance']:g}" for n in refs])
    rows.append(["result", "-"] + [by[n]["status"].upper() for n in refs])
    return rows


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


def comparison(report: dict) -> str:
    """Every checkpoint as the seed's comparison table (first value, mean, std, max abs diff, result per reference)."""
    out = []
    ids = sorted({r["id"] for r in report["results"]})
    for i in ids:
        r0 = next(r for r in report["results"] if r["id"] == i)
        rows = comparison_rows(report, i)
        if rows:
            out.append(f"{i}. {r0['name']}  shape {r0['shape']}  tolerance {r0['tolerance']:g}")
            out.append(_grid(rows))
            out.append("")
    return "\n".join(out)


def markdown(report: dict) -> str:
    out = [f"# llorch-cpud validation report", ""]
    out.append(f"- model: `{report['model']}` ({report['family']})")
    out.append(f"- weights: {report['weights']}")
    out.append(f"- numerics: {report.get('numerics', 'float32')}")
    out.append(f"- prompt: {report['prompt']!r} -> ids {report['prompt_ids']}")
    out.append(f"- greedy tokens compared: {report['n_tokens']}")
    out.append(f"- references: {', '.join(report['references'])}")
    for name, reason in report.get("skipped", {}).items():
        out.append(f"- skipped reference {name}: {reason}")
    for line in footnotes(report):
        out.append(f"- {line}")
    out.append(f"- result: **{'PASS' if report['passed'] else 'FAIL'}**")
    out.append("")
    out.append("## Summary")
    out.append("")
    out.append("```")
    out.append(table(report, notes=False))  # the footnotes are in the list above
    out.append("```")
    out.append("")
    out.append("## Comparison, per checkpoint")
    out.append("")
    out.append("One column per reference, as in the seed's comparison table. For stage checkpoints (1, 2, 4-7) our "
               "stage function is fed each reference's own stage input; the llorch-cpud column shows the run on the "
               "first reference's inputs.")
    out.append("")
    for i in sorted({r["id"] for r in report["results"]}):
        rows = comparison_rows(report, i)
        if not rows:
            continue
        r0 = next(r for r in report["results"] if r["id"] == i)
        out.append(f"### {i}. {r0['name']} (tolerance {r0['tolerance']:g}, shape {r0['shape']})")
        out.append("")
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "---|" * len(rows[0]))
        for row in rows[1:]:
            out.append("| " + " | ".join(row) + " |")
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
        d = "-" if d is None else d if isinstance(d, str) else f"{d:.3e}"
        out.append(
            f"| {r['id']} | {r['name']} | {r['reference']} | {r['shape']} | {d} | {r['tolerance']:g} | {r['status']} "
            f"| {s4(o)} | {s4(f)} | {first(o)} / {first(f)} | {r['note'].replace('|', '/')} |"
        )
    out.append("")
    return "\n".join(out + versions_section(report)) + "\n"


def versions_section(report: dict) -> list[str]:
    """The markdown lines of a report's "Versions" section (what ran: packages, machine, commit)."""
    return ["## Versions", "", *(f"- {k}: {v}" for k, v in report["versions"].items())]


def write(report: dict, folder: Path, markdown_text: str | None = None) -> tuple[Path, Path]:
    """report.json and report.md (`markdown_text`, else this module's `markdown(report)`) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    j, m = folder / "report.json", folder / "report.md"
    j.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m.write_text(markdown(report) if markdown_text is None else markdown_text, encoding="utf-8")
    return j, m
