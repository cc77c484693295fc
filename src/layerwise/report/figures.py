"""Comparison figures as PNG bytes: Pareto fronts (perplexity vs size and latency) and per-layer allocations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..gguf import GGUF_TYPES
from ..registry import Registry
from .canvas import png_bytes, subplots
from .tables import RunSummary


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on both), sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox <= x and oy <= y) and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


PARETO_AXES: list[tuple[str, Callable[[RunSummary], Optional[float]]]] = [
    ("stored weight bytes (MiB)", lambda run: run.weight_bytes / 2**20),
    ("non-zero parameters (M)", lambda run: run.nonzero_parameters / 1e6),
    ("measured prefill latency (ms)", lambda run: run.prefill_ms),
]


def pareto_plot(runs: list[RunSummary]) -> Optional[bytes]:
    """Perplexity against each cost axis, the Pareto front joined; None when no run has a perplexity."""
    measured = [run for run in runs if run.ppl is not None]
    if not measured:
        return None
    # an axis no run measured (latency after --no-latency runs) is left out rather than drawn empty
    axes_shown = [(label, cost) for label, cost in PARETO_AXES if any(cost(run) is not None for run in measured)]
    fig, axes = subplots(1, len(axes_shown), figsize=(5.2 * len(axes_shown), 4.2), squeeze=False)
    for ax, (label, cost) in zip(axes[0], axes_shown):
        shown = [run for run in measured if cost(run) is not None]
        points = [(cost(run), run.ppl) for run in shown]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
        for run, (x, y) in zip(shown, points):
            ax.annotate(run.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points)
        if len(front) > 1:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", lw=1,
                    label="Pareto front", zorder=2)
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("perplexity vs cost (lower left is better)")
    fig.tight_layout()
    return png_bytes(fig)


@dataclass(frozen=True)
class LayerMap:
    """A layer x component grid of one allocation quantity (sparsity, kept width, bits, removed)."""

    title: str
    quantity: str
    rows: list[str]
    blocks: list[int]
    values: list[list[Optional[float]]]


# Each capability registers how to read its per-layer allocation from a result record.
ALLOCATION_VIEWS: Registry[Callable[[dict], Optional[LayerMap]]] = Registry("allocation view")


def _split_unit(unit: str) -> tuple[int, str]:
    """(block, component) of ``model.layers.3.mlp.down_proj`` -> (3, 'mlp.down_proj')."""
    parts = unit.split(".")
    index = next(i for i, part in enumerate(parts) if part.isdigit())
    return int(parts[index]), ".".join(parts[index + 1 :])


@ALLOCATION_VIEWS.register("sparsity")
def sparsity_map(record: dict) -> Optional[LayerMap]:
    """Measured sparsity of every decoder linear, by block and projection."""
    per_unit = record["metrics"].get("per_unit_sparsity")
    if not per_unit or max(per_unit.values()) < 0.01:  # nothing sparsified (a dense, depth or width run)
        return None
    cells = {_split_unit(unit): value for unit, value in per_unit.items()}
    blocks = sorted({block for block, _ in cells})
    rows = list(dict.fromkeys(component for _, component in cells))
    values = [[cells.get((block, row)) for block in blocks] for row in rows]
    return LayerMap("sparsity per linear", "sparsity", rows, blocks, values)


@ALLOCATION_VIEWS.register("removed")
def removed_map(record: dict) -> Optional[LayerMap]:
    """Which attention / MLP sublayers a depth run removed (1 = removed), by block."""
    removed = record["metrics"].get("removed_sublayers")
    if not removed:
        return None
    blocks = list(range(record["plan"]["architecture"]["num_blocks"]))
    cells = {_split_unit(unit) for unit in removed}
    rows = ["self_attn", "mlp"]
    values = [[1.0 if (block, row) in cells else 0.0 for block in blocks] for row in rows]
    return LayerMap(f"removed sublayers ({len(removed)})", "removed", rows, blocks, values)


@ALLOCATION_VIEWS.register("width")
def width_map(record: dict) -> Optional[LayerMap]:
    """Kept fraction of each block's query heads and FFN channels after width pruning."""
    widths = record["metrics"].get("widths")
    if not widths:
        return None
    dense = record["plan"]["details"]["dense_widths"]
    blocks = list(range(len(widths["groups"])))

    def kept(kind: str) -> list[Optional[float]]:
        return [1.0 if dense[kind][b] is None else widths[kind][b] / dense[kind][b] for b in blocks]

    return LayerMap("kept width (heads in whole KV groups, FFN channels)", "kept fraction",
                    ["attention heads", "FFN channels"], blocks, [kept("groups"), kept("channels")])


def _bits_per_weight(level: str | int) -> float:
    """A plan's level as stored bits per weight: an own-grid width, or a GGUF type's (q4_k -> 4.5)."""

    return GGUF_TYPES[level].bits_per_weight if level in GGUF_TYPES else float(level)


@ALLOCATION_VIEWS.register("bits")
def bits_map(record: dict) -> Optional[LayerMap]:
    """Bit width of every quantized decoder linear, by block and projection."""
    bits = (record.get("plan") or {}).get("details", {}).get("bits")
    if not bits or not any(action.get("op") == "quantize" for action in record["plan"]["actions"]):
        return None
    cells = {_split_unit(unit): _bits_per_weight(value) for unit, value in bits.items()}
    blocks = sorted({block for block, _ in cells})
    rows = list(dict.fromkeys(component for _, component in cells))
    values = [[cells.get((block, row)) for block in blocks] for row in rows]
    average = record["plan"]["prediction"].get("avg_bits")
    return LayerMap(f"bits per linear (average {average:.2f})", "bits", rows, blocks, values)


def bits_search_plot(runs: list[RunSummary]) -> Optional[bytes]:
    """AutoMP-RL searches: proxy perplexity, memory saving and reward per episode."""
    traced = [run for run in runs if run.record["metrics"].get("bits_curve")]
    if not traced:
        return None
    fig, axes = subplots(1, 3, figsize=(15, 4.0))
    for key, ax, label in (("ppl", axes[0], "proxy perplexity"), ("memory_saving", axes[1], "memory saving vs 16-bit"),
                           ("reward", axes[2], "reward")):
        for run in traced:
            curve = run.record["metrics"]["bits_curve"]
            ax.plot([p["episode"] for p in curve], [p[key] for p in curve], lw=1, label=run.name)
        ax.set_xlabel("episode")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("bit-allocation search per episode")
    fig.tight_layout()
    return png_bytes(fig)


STATISTIC_PANELS = (("mean_abs", "input mean |x|", False), ("max_abs", "input max |x|", True),
                    ("std", "input std", False), ("kurtosis", "input kurtosis", True),
                    ("weight_std", "weight std", False), ("weight_max_abs", "weight max |w|", True))


def quant_statistics_plot(runs: list[RunSummary]) -> Optional[bytes]:
    """Per-layer activation and weight statistics of the first quantization run (what AutoMP-RL's policy
    reads), one line per projection: where outliers and heavy tails sit shows which layers need bits."""
    run = next((r for r in runs if (r.record.get("plan") or {}).get("details", {}).get("statistics")), None)
    if run is None:
        return None
    statistics = run.record["plan"]["details"]["statistics"]
    by_role: dict[str, dict[int, dict]] = {}
    for unit, values in statistics.items():
        block, role = _split_unit(unit)
        by_role.setdefault(role, {})[block] = values
    fig, axes = subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, label, log) in zip(axes.flat, STATISTIC_PANELS):
        for role, blocks in by_role.items():
            order = sorted(blocks)
            ax.plot(order, [blocks[b][key] for b in order], lw=1.2, marker=".", label=role)
        ax.set_xlabel("block")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"per-layer input and weight statistics ({run.name}, calibration profile)")
    fig.tight_layout()
    return png_bytes(fig)


def _seed_groups(runs: list[RunSummary]) -> dict[str, list[float]]:
    """Final perplexities across seeds: a run's ``--seeds`` summaries (proxy PPL), and runs that differ only
    in their seed (evaluated PPL), grouped by label."""
    groups: dict[str, list[float]] = {}
    for run in runs:
        seeds = (run.record.get("plan") or {}).get("details", {}).get("seeds") or []
        if len(seeds) > 1:
            groups[f"{run.name}\n(proxy, {len(seeds)} seeds)"] = [s["proxy_ppl"] for s in seeds]
    by_setting: dict[str, list[RunSummary]] = {}
    for run in runs:
        if run.ppl is not None:
            settings = {k: v for k, v in (run.record.get("settings") or {}).items() if k != "seed"}
            key = repr((run.label, run.record.get("budget"), sorted(settings.items())))
            by_setting.setdefault(key, []).append(run)
    for members in by_setting.values():
        if len({m.record.get("seed") for m in members}) > 1:
            groups[f"{members[0].label}\n({len(members)} seeds)"] = [m.ppl for m in members]
    return groups


def seeds_box_plot(runs: list[RunSummary]) -> Optional[bytes]:
    """Box plot of the final perplexity across seeds, for every searched setting run with several seeds."""
    groups = _seed_groups(runs)
    if not groups:
        return None
    fig, ax = subplots(figsize=(max(5.0, 2.2 * len(groups)), 4.2))
    ax.boxplot(list(groups.values()), showmeans=True)
    for index, values in enumerate(groups.values(), start=1):
        ax.scatter([index] * len(values), values, s=12, color="k", zorder=3)
    ax.set_xticks(range(1, len(groups) + 1), list(groups), fontsize=7)
    ax.set_ylabel("perplexity")
    ax.set_title("final perplexity across seeds")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return png_bytes(fig)


def rl_curve_plot(runs: list[RunSummary]) -> Optional[bytes]:
    """The RL searches' training curves: each episode's objective and the best seen, against environment steps."""
    traced = [run for run in runs if run.record["metrics"].get("rl_curve")]
    if not traced:
        return None
    fig, ax = subplots(figsize=(6.5, 4.2))
    for index, run in enumerate(traced):
        curve = run.record["metrics"]["rl_curve"]
        color = f"C{index % 10}"
        steps = [point["step"] for point in curve]
        ax.plot(steps, [point["value"] for point in curve], color=color, alpha=0.35, lw=1)
        ax.plot(steps, [point["best_value"] for point in curve], color=color, lw=2, label=f"{run.name} (best)")
    return _finish(fig, ax, "environment steps", "objective (accuracy term − weighted costs)",
                   "RL training: episode objective (thin) and best plan seen (thick)")


def healing_plot(runs: list[RunSummary]) -> Optional[bytes]:
    """Healing's training loss (thin) and held-out next-token NLL (markers) against training tokens."""
    traced = [run for run in runs if run.record["metrics"].get("healing")]
    if not traced:
        return None
    fig, ax = subplots(figsize=(6.5, 4.2))
    for index, run in enumerate(traced):
        healing = run.record["metrics"]["healing"]
        color = f"C{index % 10}"
        curve = healing["curve"]
        ax.plot([p["tokens"] for p in curve], [p["loss"] for p in curve], color=color, alpha=0.4, lw=1,
                label=f"{run.name}: {healing['objective']} loss")
        heldout = [p for p in healing["heldout"] if p.get("nll") is not None]
        ax.plot([p["tokens"] for p in heldout], [p["nll"] for p in heldout], color=color, marker="o", lw=2,
                label=f"{run.name}: held-out NLL")
    return _finish(fig, ax, "training tokens", "loss (nats)", "healing: training loss and held-out NLL")


def trajectory_plot(runs: list[RunSummary]) -> Optional[bytes]:
    """Perplexity against measured speedup at each evaluated step of depth searches (milestones, then final)."""
    traced = [run for run in runs if run.record["metrics"].get("milestones") is not None]
    if not traced:
        return None
    fig, ax = subplots(figsize=(6.5, 4.2))
    for run in traced:
        metrics = run.record["metrics"]
        points = [((m.get("speedup") or {}).get("total"), m.get("ppl"), m.get("predicted_speedup"))
                  for m in metrics["milestones"]]
        points.append(((metrics.get("speedup") or {}).get("total"), metrics.get("ppl"), metrics.get("predicted_speedup")))
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run.name)
    ax.set_yscale("log")
    return _finish(fig, ax, "measured speedup (dense time / pruned time)", "perplexity (log)",
                   "depth pruning: speedup vs perplexity per evaluated step")


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> bytes:
    """Labels, grid, legend and title of a one-axis line plot, as PNG bytes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return png_bytes(fig)


def allocation_maps(record: dict) -> list[LayerMap]:
    """Every allocation view that applies to this run."""
    return [m for name in ALLOCATION_VIEWS if (m := ALLOCATION_VIEWS.get(name)(record)) is not None]


def value_range(maps: list[LayerMap]) -> tuple[float, float]:
    """One colour scale for maps of the same quantity, so runs compare at a glance."""
    values = [v for m in maps for row in m.values for v in row if v is not None]
    return (min(values), max(values)) if values else (0.0, 1.0)


def layer_map_plot(run: RunSummary, layer_map: LayerMap, scale: tuple[float, float] | None = None) -> bytes:
    """A heatmap of one run's allocation, blocks along x, on a shared colour ``scale`` when given."""

    grid = np.array([[np.nan if v is None else v for v in row] for row in layer_map.values], dtype=float)
    width = max(6.0, 0.28 * len(layer_map.blocks) + 3)
    fig, ax = subplots(figsize=(width, 0.35 * len(layer_map.rows) + 1.6))
    vmin, vmax = scale or (None, None)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(layer_map.rows)), layer_map.rows, fontsize=8)
    ax.set_xticks(range(len(layer_map.blocks)), layer_map.blocks, fontsize=7)
    ax.set_xlabel("decoder block")
    ax.set_title(f"{run.name}: {layer_map.title}", fontsize=10)
    fig.colorbar(image, ax=ax, label=layer_map.quantity)
    fig.tight_layout()
    return png_bytes(fig)
