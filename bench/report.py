"""From raw runs to figures: medians, spreads, ratios to nginx, Markdown and a chart."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Optional

# A round whose direct-to-origin figure is this far from the median saw the machine disturbed.
DIRECT_DEVIATION = 0.15
FIGURES = ("throughput", "p50_ms", "p99_ms", "cpu_us_per_req", "peak_rss_mib")
RATIOS = ("throughput", "p99_ms", "cpu_us_per_req")


def spread(values: List[float]) -> Optional[Dict[str, float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def aggregate(runs: List[dict], baselines: Dict[str, Optional[str]]) -> dict:
    """Per target: median/min/max of each figure over rounds, and of its per-round ratio to
    its nginx baseline (same worker count, same round); plus disturbed rounds."""
    by_target: Dict[str, List[dict]] = {}
    for run in runs:
        by_target.setdefault(run["target"], []).append(run)
    by_round = {(r["target"], r["round"]): r for r in runs}

    suspect_rounds = []
    direct = [r["throughput"] for r in by_target.get("direct", ())]
    if len(direct) >= 2:
        med = statistics.median(direct)
        suspect_rounds = [r["round"] for r in by_target["direct"]
                          if abs(r["throughput"] / med - 1) > DIRECT_DEVIATION]

    targets = {}
    for name, rs in by_target.items():
        entry = {"layout": rs[0]["layout"], "rounds": len(rs),
                 "errors": sum(r["socket_errors"] + r["non_2xx"] for r in rs),
                 "disturbed_runs": sum(r["disturbed"] for r in rs),
                 "reloads": sum(r["reloads"] for r in rs)}
        for fig in FIGURES:
            entry[fig] = spread([r[fig] for r in rs])
        base = baselines.get(name)
        entry["baseline"] = base
        for fig in RATIOS:
            ratios = []
            for r in rs:
                b = by_round.get((base, r["round"]))
                if b and r[fig] is not None and b[fig]:
                    ratios.append(r[fig] / b[fig])
            entry[f"{fig}_ratio"] = spread(ratios)
        targets[name] = entry
    return {"targets": targets, "suspect_rounds": suspect_rounds}


def _num(v: float) -> str:
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fig(s: Optional[dict], with_spread: bool = True) -> str:
    if s is None:
        return "–"
    text = _num(s["median"])
    if with_spread and s["min"] != s["max"]:
        text += f" ({_num(s['min'])}–{_num(s['max'])})"
    return text


def _ratio(s: Optional[dict]) -> str:
    return "–" if s is None else f"{s['median']:.2f}×"


def scenario_table(result: dict) -> str:
    sc, agg = result["scenario"], result["summary"]
    unit = sc["unit"]
    lines = [f"### {sc['name']}: {sc['description']}", ""]
    lines.append(f"| target | layout | {unit} | ×nginx | p50 ms | p99 ms | p99 ×nginx "
                 f"| CPU µs/req | ×nginx | peak RSS MiB | errors | note |")
    lines.append("|" + "---|" * 12)
    for name, t in agg["targets"].items():
        note = []
        if t["disturbed_runs"]:
            note.append(f"{t['disturbed_runs']} disturbed run(s)")
        if t["reloads"]:
            note.append(f"{t['reloads']} reloads")
        lines.append("| " + " | ".join([
            name, t["layout"], _fig(t["throughput"]), _ratio(t["throughput_ratio"]),
            _fig(t["p50_ms"], False), _fig(t["p99_ms"]), _ratio(t["p99_ms_ratio"]),
            _fig(t["cpu_us_per_req"]), _ratio(t["cpu_us_per_req_ratio"]),
            _fig(t["peak_rss_mib"], False), str(t["errors"]), ", ".join(note)]) + " |")
    if agg["suspect_rounds"]:
        lines.append("")
        lines.append(f"Rounds {agg['suspect_rounds']} flagged: direct-to-origin deviated more "
                     f"than {DIRECT_DEVIATION:.0%} from its median.")
    return "\n".join(lines)


def ratio_table(results: List[dict]) -> str:
    """One line per proxy target: throughput and CPU/request ratios to nginx, per scenario."""
    names = []
    for res in results:
        names += [n for n, t in res["summary"]["targets"].items()
                  if t["baseline"] and not n.startswith("nginx") and n not in names]
    lines = ["| target | " + " | ".join(r["scenario"]["name"] for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for name in names:
        cells = []
        for res in results:
            t = res["summary"]["targets"].get(name)
            if t is None:
                cells.append("")
            else:
                cells.append(f"{_ratio(t['throughput_ratio'])} / "
                             f"{_ratio(t['cpu_us_per_req_ratio'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: List[dict], header: dict) -> str:
    h = header
    parts = [
        f"## Benchmark {h['date']}",
        "",
        f"{h['machine']}; {h['versions']}.",
        f"{h['rounds']} interleaved round(s) of {h['duration']:g} s after a warm-up; "
        f"access log {h['access_log']}; median (min–max) over rounds; ratios are to nginx with "
        f"the same worker count in the same round.",
        "",
        "Ratios to nginx, throughput / CPU per request:",
        "",
        ratio_table(results),
    ]
    for res in results:
        parts += ["", scenario_table(res)]
    return "\n".join(parts) + "\n"


def chart(results: List[dict], path: Path) -> bool:
    """Bars of throughput and CPU µs/request per target, one row per scenario.
    Returns False when matplotlib is not installed (pip install -e '.[bench]')."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 2.6 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        targets = res["summary"]["targets"]
        names = list(targets)
        colors = ["tab:green" if n.startswith("fastproxy") else "tab:blue" if n.startswith("nginx")
                  else "tab:orange" if n.startswith("haproxy") else "tab:gray" for n in names]
        for ax, fig_name, label in ((row[0], "throughput", res["scenario"]["unit"]),
                                    (row[1], "cpu_us_per_req", "CPU µs/request")):
            meds, errs = [], [[], []]
            for n in names:
                s = targets[n][fig_name]
                meds.append(s["median"] if s else 0)
                errs[0].append(s["median"] - s["min"] if s else 0)
                errs[1].append(s["max"] - s["median"] if s else 0)
            ax.bar(names, meds, yerr=errs, color=colors, capsize=3)
            ax.set_title(f"{res['scenario']['name']}: {label}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7, rotation=30)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
