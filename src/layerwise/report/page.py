"""The comparison report: one self-contained HTML page (PNGs embedded as data URIs) or a markdown table."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Callable, Optional

from ..cache import atomic_write_text
from ..errors import DataError
from ..registry import Registry
from .allocation import plot_allocation
from .figures import (
    allocation_maps,
    bits_search_plot,
    healing_plot,
    layer_map_plot,
    pareto_plot,
    quant_statistics_plot,
    rl_curve_plot,
    seeds_box_plot,
    trajectory_plot,
    value_range,
)
from .tables import RunSummary, comparison_table, markdown_table, summarize

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1em 0; }
.note { color: #555; font-size: 0.85em; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="comparison"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _protocol_notes(runs: list[RunSummary]) -> str:
    notes = []
    for run in runs:
        parts = []
        protocol = run.record.get("protocol")
        if protocol:
            parts.append(f"PPL on {protocol['corpus']}/{protocol['split']}, {protocol['windows']}×{protocol['seqlen']} "
                         f"tokens, {protocol['dtype']}")
        zeroshot = run.record["metrics"].get("zeroshot")
        if zeroshot:
            p = zeroshot["protocol"]
            parts.append(f"zero-shot via lm-eval {p['lm_eval_version']}, limit {p['limit'] or 'all'}, seed {p['seed']}")
        latency = run.record["metrics"].get("latency")
        if latency:
            s = latency["setting"]
            parts.append(f"latency: prompt {s['prompt_length']}, {s['generation_length']} decoded tokens, batch "
                         f"{s['batch_size']}, median of {s['repeats']} on {latency['device']} ({latency['threads']} threads)")
        notes.append(f"<li><b>{html.escape(run.name)}</b>: {html.escape('; '.join(parts) or 'no protocol recorded')}</li>")
    return "<ul class='note'>" + "".join(notes) + "</ul>"


# (heading, alt text, figure over all runs): each section appears when its figure applies to some run
FIGURES: list[tuple[str, str, Callable[[list[RunSummary]], Optional[bytes]]]] = [
    ("Perplexity vs cost", "Pareto plot of perplexity vs cost", pareto_plot),
    ("Speedup vs perplexity per step", "speedup vs perplexity per step", trajectory_plot),
    ("RL training curve", "RL training curve", rl_curve_plot),
    ("Healing loss", "healing training and held-out loss", healing_plot),
    ("Bit-allocation search", "bit-allocation search per episode", bits_search_plot),
    ("Final perplexity across seeds", "box plot of final perplexity across seeds", seeds_box_plot),
    ("Per-layer weight and activation statistics", "per-layer statistics", quant_statistics_plot),
]


def render_html(runs: list[RunSummary]) -> str:
    """The full page: comparison table, Pareto plots, then each run's per-layer allocation."""
    headers, rows = comparison_table(runs)
    sections = [
        "<h1>layerwise run comparison</h1>",
        f"<p class='note'>{len(runs)} run(s); generated {time.strftime('%Y-%m-%d %H:%M')}. Accuracies in % "
        "(acc_norm where the task defines it) ± standard error; speedups are dense time ÷ compressed time "
        "measured in the same run.</p>",
        _html_table(headers, rows),
        _protocol_notes(runs),
    ]
    for heading, alt, plot in FIGURES:
        png = plot(runs)
        if png is not None:
            sections += [f"<h2>{heading}</h2>", _img(png, alt)]
    allocations = [(run, m) for run in runs for m in allocation_maps(run.record)]
    if allocations:
        sections.append("<h2>Per-layer allocation</h2>")
        scales = {q: value_range([m for _, m in allocations if m.quantity == q]) for q in {m.quantity for _, m in allocations}}
        sections += [_img(layer_map_plot(run, m, scales[m.quantity]), f"{run.name}: {m.title}") for run, m in allocations]
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>layerwise report</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def render_markdown(runs: list[RunSummary]) -> str:
    headers, rows = comparison_table(runs)
    return markdown_table(headers, rows)


def _write_text(render: Callable[[list[RunSummary]], str]) -> Callable[[list[RunSummary], Path], None]:
    return lambda runs, out: atomic_write_text(out, render(runs))


def _write_allocation_png(runs: list[RunSummary], out: Path) -> None:
    if len(runs) != 1:
        raise DataError("The png format draws one run's allocation; name exactly one run directory.")
    plot_allocation(runs[0].record, out)


# format -> (writer, default file name inside a single run's directory)
FORMATS: Registry[tuple[Callable[[list[RunSummary], Path], None], str]] = Registry("report format")
FORMATS.add("html", (_write_text(render_html), "report.html"))
FORMATS.add("md", (_write_text(render_markdown), "report.md"), "markdown")
FORMATS.add("png", (_write_allocation_png, "allocation.png"))


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, fmt: str | None = None) -> Path:
    """Compare the runs in ``run_dirs`` and write the report to ``out``.

    The format comes from ``fmt``, else from the suffix of ``out``, else html; with one run and no ``out``
    the report goes into that run's directory.
    """
    if not run_dirs:
        raise DataError("Name at least one run directory to report on.")
    fmt = fmt or (Path(out).suffix.lstrip(".") if out else "") or "html"
    write, default_name = FORMATS.get(fmt)
    runs = [summarize(run_dir) for run_dir in run_dirs]
    if out is None:
        if len(run_dirs) > 1:
            raise DataError("Pass --out FILE when comparing several runs.")
        out = Path(run_dirs[0]) / default_name
    out = Path(out)
    write(runs, out)
    return out
