"""``qdec report``: tables and plots from the JSON files ``qdec eval`` wrote,
merged (e.g. a 3-bit run and a 2-bit run made separately)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def load_results(paths: list[Path]) -> dict:
    """Merge eval results: the reference of the first file, the variants of all
    (each file's variants keep their own reference perplexity for gap closed).

    Raises:
        ValueError: the files disagree on the reference perplexity by more than
            0.1 % (different text, windows or model: not comparable).
    """
    if not paths:
        raise ValueError("give at least one results file")
    merged: dict | None = None
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable qdec eval JSON file ({e})") from None
        if "reference" not in r or "variants" not in r:
            raise ValueError(f"{path}: missing 'reference' or 'variants'; not a qdec eval file")
        if merged is None:
            merged = {**r, "variants": [], "sources": []}
        elif not math.isclose(r["reference"]["ppl"], merged["reference"]["ppl"], rel_tol=1e-3):
            raise ValueError(f"{path}: reference perplexity {r['reference']['ppl']:.3f} differs "
                             f"from {merged['reference']['ppl']:.3f} of {paths[0]}; "
                             f"not the same evaluation")
        merged["variants"].extend(r["variants"])
        merged["sources"].append(str(path))
    return merged


def log_gap_closed(ref: float, quant: float, compensated: float) -> float:
    """The gap closed in mean NLL (log perplexity). For a broken base model
    (2-bit RTN at perplexity 10^6) the perplexity gap is closed ~100 % by any
    improvement; the NLL gap still tells the methods apart."""
    if quant == ref or min(ref, quant, compensated) <= 0:
        return float("nan")  # no gap, or not perplexities (e.g. an output error of 0)
    return (math.log(quant) - math.log(compensated)) / (math.log(quant) - math.log(ref))


def sweep_table(results: dict) -> str:
    """Markdown: one row per variant x policy, perplexity (gap closed in
    perplexity; in NLL) per k."""
    ref = results["reference"]["ppl"]
    lines = []
    for v in results["variants"]:
        fractions = sorted({c["fraction"] for c in v["compensated"]})
        if not fractions:
            continue
        lines.append(f"**{v['label']}**: reference {ref:.2f}, quantized "
                     f"{v['quantized']['ppl']:.2f}\n")
        lines.append("| policy | " + " | ".join(f"k = {f:.0%}" for f in fractions) + " |")
        lines.append("|---|" + "---|" * len(fractions))
        for policy in dict.fromkeys(c["policy"] for c in v["compensated"]):
            cells = []
            for f in fractions:
                c = next((c for c in v["compensated"]
                          if c["policy"] == policy and c["fraction"] == f), None)
                cells.append("-" if c is None else
                             f"{c['ppl']:.2f} ({c['gap_closed']:.0%}; "
                             f"{log_gap_closed(ref, v['quantized']['ppl'], c['ppl']):.0%})")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def budget_table(results: dict) -> str:
    """Markdown: per variant with ``qdec eval --budget`` runs, uniform vs
    allocated k at each budget (equal bytes fetched per token): perplexity
    and gap closed on the evaluation text and on the calibration text, the
    candidate the calibration text chose (``allocated`` in results written
    before the choice existed), and every candidate's calibration perplexity."""
    ref = results["reference"]["ppl"]
    lines = []
    for v in results["variants"]:
        runs = v.get("budget", {}).get("runs", [])
        if not runs:
            continue
        lines.append(f"**{v['label']}** (fetch budget; gain measure "
                     f"{v['budget']['gain_measure']}): reference {ref:.2f}, quantized "
                     f"{v['quantized']['ppl']:.2f}\n")
        lines.append("| budget | KiB fetched/token (uniform / allocated) | uniform | allocated "
                     "| chosen on calibration | calibration text: uniform | allocated |")
        lines.append("|---|---|---|---|---|---|---|")
        for spec in dict.fromkeys(r["budget"] for r in runs):
            u = next(r for r in runs if r["budget"] == spec and r["allocation"] == "uniform")
            a = next(r for r in runs if r["budget"] == spec and r["allocation"] == "allocated")

            def cell(r, ppl="ppl", gap="gap_closed"):
                return "-" if r.get(ppl) is None else f"{r[ppl]:.2f} ({r[gap]:.0%})"

            def calib(r):
                return cell(r, "calib_ppl", "calib_gap_closed")

            lines.append(f"| {spec} | {u['fetched_bytes_per_token'] / 1024:.1f} / "
                         f"{a['fetched_bytes_per_token'] / 1024:.1f} | {cell(u)} | {cell(a)} | "
                         f"{a.get('choice', 'allocated')} | {calib(u)} | {calib(a)} |")
        lines.append("")
        candidates = v["budget"].get("candidates")
        if candidates:
            names = [n for n in next(iter(candidates.values())) if n != "chosen"]
            on_test = {(r["budget"], r["choice"]): r for r in runs if "choice" in r}
            lines.append("Calibration-text perplexity of every candidate k map (the lowest "
                         "is used, in bold; uniform on ties), and its evaluation-text "
                         "perplexity (gap closed) where it was scored:\n")
            lines.append("| budget | " + " | ".join(names) + " |")
            lines.append("|---|" + "---|" * len(names))
            for spec, c in candidates.items():
                cells = []
                for n in names:
                    cell = f"{math.exp(c[n]['calib_nll']):.3f}"
                    cell = f"**{cell}**" if n == c["chosen"] else cell
                    if (r := on_test.get((spec, n))) is not None:
                        cell += f" / {r['ppl']:.2f} ({r['gap_closed']:.0%})"
                    cells.append(cell)
                lines.append(f"| {spec} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def group_scales_table(results: dict) -> str:
    """Markdown: per variant with ``group_scales`` (:func:`qdec.budget.fit_group_scales`),
    each group's measured calibration-loss drop against the gain curves'
    prediction for the same step, and the scale the calibrated curves use."""
    lines = []
    for v in results["variants"]:
        gs = v.get("budget", {}).get("group_scales")
        if not gs:
            continue
        lines.append(f"**{v['label']}**: doubling each group's k at {gs['fraction']:.1%} uniform "
                     f"(calibration NLL {gs['base_nll']:.4f}); all groups measured / predicted "
                     f"{gs['overall_scale']:.2f}\n")
        lines.append("| group | KiB added/token | measured drop (nats/token) | predicted | scale |")
        lines.append("|---|---|---|---|---|")
        for g, r in gs["groups"].items():
            lines.append(f"| {g} | {r['bytes'] / 1024:.1f} | {r['measured']:.5f} | "
                         f"{r['predicted']:.5f} | {r['scale']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot_budget(results: dict, path: Path) -> None:
    """Perplexity against KiB fetched per token, uniform vs allocated, one
    panel per variant with budget runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in results["variants"] if v.get("budget", {}).get("runs")]
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(5 * max(1, len(variants)), 4),
                             squeeze=False)
    ref = results["reference"]["ppl"]
    for ax, v in zip(axes[0], variants):
        for kind, marker in (("uniform", "o"), ("allocated", "s")):
            pts = sorted((r["fetched_bytes_per_token"] / 1024, r["ppl"])
                         for r in v["budget"]["runs"] if r["allocation"] == kind)
            ax.plot([0] + [p[0] for p in pts], [v["quantized"]["ppl"]] + [p[1] for p in pts],
                    marker=marker, label=f"{kind} k")
        ax.axhline(ref, color="k", ls="--", lw=1, label="reference")
        ax.set_title(v["label"])
        ax.set_xlabel("residual KiB fetched per token")
        ax.set_ylabel("perplexity")
        if v["quantized"]["ppl"] > 20 * ref:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    from .sweep import save_figure

    save_figure(fig, path)


def write_report(paths: list[Path], out_prefix: Path) -> dict[str, Path]:
    """Write ``<prefix>.md`` (sweep and cost tables) and the plots
    ``<prefix>.png`` (perplexity against k) and ``<prefix>_costs.png`` (matched
    cost), the latter two only when the results have such data."""
    from .costs import cost_table, plot_costs
    from .sweep import plot_results

    results = load_results(paths)
    ref = results["reference"]["ppl"]
    written: dict[str, Path] = {}
    parts = [f"# QDEC evaluation: {results.get('model', '')}\n",
             f"Reference perplexity {ref:.3f}; {results['reference']['windows']} windows x "
             f"{results['config'].get('seq_len', '?')} tokens; sources: "
             f"{', '.join(results['sources'])}\n", sweep_table(results)]
    if any(v["compensated"] for v in results["variants"]):
        written["plot"] = out_prefix.with_suffix(".png")
        plot_results({**results, "variants": [v for v in results["variants"]
                                               if v["compensated"]]}, written["plot"])
    if any(v.get("budget", {}).get("runs") for v in results["variants"]):
        parts.append(f"## Fetch budget: uniform vs allocated k at equal bytes\n\n"
                     f"{budget_table(results)}\n")
        if scales := group_scales_table(results):
            parts.append(f"### Gain-curve scales fitted on calibration loss\n\n{scales}\n")
        written["budget_plot"] = out_prefix.with_name(out_prefix.name + "_budget.png")
        plot_budget(results, written["budget_plot"])
    costed = [v for v in results["variants"] if v.get("cost_comparison")]
    for v in costed:
        parts.append(f"## Matched cost: {v['label']}\n\n{cost_table(v['cost_comparison'], ref)}\n")
    if costed:
        written["cost_plot"] = out_prefix.with_name(out_prefix.name + "_costs.png")
        plot_costs(costed, ref, written["cost_plot"])
    written["table"] = out_prefix.with_suffix(".md")
    tmp = written["table"].with_name(f".{written['table'].name}.tmp")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("\n".join(parts))
    tmp.replace(written["table"])
    return written
