"""Markdown rendering of benchmarks/loader.py's results (the same dict it writes with --json)."""

from __future__ import annotations

OURS = "ours"
PEERS = ("annbatch", "tiledbsoma-ml")


def _fmt(value, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ratio(a, b) -> str:
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}x"


def _metrics(tool_result: dict) -> dict:
    build, run = tool_result.get("build", {}), tool_result.get("run", {})
    return {
        "build_s": build.get("build_s"),
        "store_mb": build["store_bytes"] / 1e6 if "store_bytes" in build else None,
        "cells_per_s": run.get("cells_per_s"),
        "first_batch_s": run.get("first_batch_s"),
        "peak_rss_mb": run.get("peak_rss_mb"),
        "children_rss_mb": run.get("peak_rss_workers_mb") or None,
        "baseline_mb": run.get("rss_baseline_mb"),
        "own_mb": (run["peak_rss_mb"] - run["rss_baseline_mb"]) if "rss_baseline_mb" in run else None,
        "mixing": run.get("mixing_entropy"),
        "mixing_min": run.get("mixing_entropy_min"),
        "rows": run.get("timed_rows"),
        "error": build.get("error") or run.get("error"),
    }


def _size_table(entry: dict) -> list[str]:
    lines = [
        f"### {entry['n_cells']:,} cells x {entry['n_genes']:,} genes "
        f"(source .h5ad {entry['source_bytes'] / 1e6:,.0f} MB; {entry['n_donors']} donors, mixing ceiling "
        f"ln({entry['n_donors']}) = {entry['ln_n_donors']:.4f}, global donor entropy {entry['global_entropy']:.4f} nats)",
        "",
        "| loader | build (s) | store (MB) | cells/s | first batch (s) | peak RSS (MB) | RSS after imports (MB) "
        "| peak - imports (MB) | mixing, mean (min) nats | cells timed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    metrics = {tool: _metrics(result) for tool, result in entry["tools"].items()}
    for tool, m in metrics.items():
        if m["error"]:
            lines.append(f"| {tool} | failed: {m['error']} | | | | | | | | |")
            continue
        rss = _fmt(m["peak_rss_mb"]) + (
            f" (+ {_fmt(m['children_rss_mb'])} largest worker)" if m["children_rss_mb"] else ""
        )
        lines.append(
            f"| {tool} | {_fmt(m['build_s'], ',.1f')} | {_fmt(m['store_mb'])} | {_fmt(m['cells_per_s'])} "
            f"| {_fmt(m['first_batch_s'], '.2f')} | {rss} | {_fmt(m['baseline_mb'])} | {_fmt(m['own_mb'])} "
            f"| {_fmt(m['mixing'], '.4f')} ({_fmt(m['mixing_min'], '.4f')}) | {_fmt(m['rows'])} |"
        )
    ours = metrics.get(OURS)
    for peer in PEERS:
        other = metrics.get(peer)
        if ours and other and not ours["error"] and not other["error"]:
            lines.append(
                f"| *ours / {peer}* | {_ratio(ours['build_s'], other['build_s'])} "
                f"| {_ratio(ours['store_mb'], other['store_mb'])} | {_ratio(ours['cells_per_s'], other['cells_per_s'])} "
                f"| {_ratio(ours['first_batch_s'], other['first_batch_s'])} "
                f"| {_ratio(ours['peak_rss_mb'], other['peak_rss_mb'])} | {_ratio(ours['baseline_mb'], other['baseline_mb'])} "
                f"| {_ratio(ours['own_mb'], other['own_mb'])} "
                f"| {_ratio(ours['mixing'], other['mixing'])} | |"
            )
    return lines


def _rss_by_size(report: dict) -> list[str]:
    sizes = [entry["n_cells"] for entry in report["sizes"]]
    tools = list(dict.fromkeys(tool for entry in report["sizes"] for tool in entry["tools"]))
    lines = [
        "### Peak RSS (MB) by dataset size (peak - RSS after imports in brackets)",
        "",
        "| loader | " + " | ".join(f"{n:,} cells" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for tool in tools:
        metrics = [_metrics(entry["tools"].get(tool, {})) for entry in report["sizes"]]
        cells = [f"{_fmt(m['peak_rss_mb'])} ({_fmt(m['own_mb'])})" for m in metrics]
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    machine = report["machine"]
    main, ab = machine.get("main_venv", {}), machine.get("annbatch_venv") or {}
    ab = ab if isinstance(ab, dict) else {}
    settings = report["settings"]
    lines = [
        "## Loader benchmark",
        "",
        f"Machine: {machine['cores']} cores, {machine['cpu']}, {machine['mem_total_mb'] / 1024:.0f} GB RAM; "
        f"{machine['platform']}; commit {machine.get('git_commit')}.",
        f"Versions: ours (hvae-pipeline {main.get('hvae-pipeline')}, Python {machine['python']}, torch {main.get('torch')}); "
        f"annbatch {ab.get('annbatch')} (Python {ab.get('python')}, zarr {ab.get('zarr')}, zarrs {ab.get('zarrs')}, "
        f"anndata {ab.get('anndata')}); tiledbsoma-ml {main.get('tiledbsoma-ml')} (tiledbsoma {main.get('tiledbsoma')}).",
        f"Batch size {settings['batch_size']}, shuffled, CSR batches. Page cache warmed by reading each store before "
        f"its run (untimed{', skipped' if settings.get('no_warm_cache') == 'True' else ''}); a warm-up pass of "
        f"{settings['warmup']} batches discarded; then "
        + ("one full epoch" if settings.get("max_batches") in (None, "None") else f"{settings['max_batches']} batches")
        + " timed from iterator creation. Peak RSS = ru_maxrss of the loading process. Mixing = mean Shannon "
        "entropy of donor labels per full batch.",
        "",
    ]
    for entry in report["sizes"]:
        lines += _size_table(entry) + [""]
    if len(report["sizes"]) > 1:
        lines += _rss_by_size(report) + [""]
    return "\n".join(lines)
