"""What runtime training and testing write next to the checkpoint: a text report and PNG plots (reward and
ε per episode, action histogram, tokens/s vs PPL per profile, profile choice by load condition)."""

from __future__ import annotations

from pathlib import Path

from ..report.canvas import png_bytes, subplots
from ..report.tables import markdown_table
from .session import summarize


def _by_episode(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    episodes: dict[int, list[float]] = {}
    for record in records:
        episodes.setdefault(record["episode"], []).append(record[key])
    order = sorted(episodes)
    return order, [sum(episodes[e]) / len(episodes[e]) for e in order]


def training_plots(records: list[dict], out: Path) -> list[Path]:
    """reward.png, epsilon.png, actions.png, speed_quality.png, conditions.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out / name
        path.write_bytes(png_bytes(fig))
        written.append(path)

    for key, label in (("reward", "mean reward"), ("epsilon", "exploration ε")):
        fig, ax = subplots(figsize=(6, 3.6))
        ax.plot(*_by_episode(records, key), marker=".")
        ax.set_xlabel("episode")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save(fig, f"{key}.png")
    profiles = sorted({r["profile"] for r in records})
    fig, ax = subplots(figsize=(7, 3.8))
    ax.bar(range(len(profiles)), [sum(r["profile"] == p for r in records) for p in profiles])
    ax.set_xticks(range(len(profiles)), profiles, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("requests")
    ax.set_title("profiles chosen")
    fig.tight_layout()
    save(fig, "actions.png")
    fig, ax = subplots(figsize=(6.5, 4.2))
    for profile in profiles:
        chosen = [r for r in records if r["profile"] == profile]
        ax.scatter([r["tokens_per_s"] for r in chosen], [r["ppl"] for r in chosen], s=10, label=profile)
    ax.set_xlabel("tokens/s")
    ax.set_ylabel("perplexity of the reference continuation")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, "speed_quality.png")
    conditions = list(dict.fromkeys(r["condition"] for r in records))
    fig, ax = subplots(figsize=(7, 3.8))
    bottom = [0.0] * len(conditions)
    for profile in profiles:
        shares = []
        for condition in conditions:
            items = [r for r in records if r["condition"] == condition]
            shares.append(sum(r["profile"] == profile for r in items) / max(1, len(items)))
        ax.bar(range(len(conditions)), shares, bottom=bottom, label=profile)
        bottom = [b + s for b, s in zip(bottom, shares)]
    ax.set_xticks(range(len(conditions)), conditions)
    ax.set_ylabel("share of requests")
    ax.legend(fontsize=6, ncol=2, bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save(fig, "conditions.png")
    return written


def text_report(records: list[dict], title: str) -> str:
    """A markdown table per (condition, policy): tokens/s, PPL, reward, switch and decision cost, profile mix."""
    rows = []
    for row in summarize(records):
        overhead = 100 * row["decide_ms"] / max(row["decode_ms"], 1e-9)
        mix = ", ".join(f"{p} {n}" for p, n in sorted(row["profiles"].items(), key=lambda kv: -kv[1]))
        rows.append([row["condition"], row["policy"], str(row["requests"]), f"{row['tokens_per_s']:.1f}",
                     f"{row['ppl']:.2f}", f"{row['reward']:.3f}", f"{row['switch_ms']:.2f}", f"{overhead:.2f}%", mix])
    return f"# {title}\n\n" + markdown_table(["load", "policy", "requests", "tokens/s", "PPL", "reward",
                                             "switch (ms)", "controller overhead", "profiles"], rows)
