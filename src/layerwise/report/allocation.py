"""Per-layer allocation plots of a run: sparsity per block and the allocator's per-block metric."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..result import Result
from .canvas import subplots


def read_result(run_dir: str | Path) -> dict:
    """The ``result.json`` of a run directory (any version, checked against ``Result``), or a clear error."""

    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise DataError(f"{run_dir} holds no result.json; pass a directory written by `layerwise compress`.")
    return Result.load(path).to_record()


def block_sparsity(record: dict) -> dict[int, float]:
    """Measured sparsity per decoder block: the mean over its linears (the allocators give every linear
    of a block one ratio, so this is also the block's parameter-weighted sparsity)."""
    per_block: dict[int, list[float]] = {}
    for unit, sparsity in record["metrics"]["per_unit_sparsity"].items():
        per_block.setdefault(_block_of(unit), []).append(sparsity)
    return {block: sum(values) / len(values) for block, values in sorted(per_block.items())}


def _block_of(unit: str) -> int:
    """The block number in a unit name such as ``model.layers.3.mlp.down_proj``."""
    return next(int(part) for part in unit.split(".") if part.isdigit())


def plot_allocation(record: dict, out: str | Path) -> Path:
    """Bars of per-block sparsity, and of the allocator's metric (alpha / outlier ratio) when it has one."""
    details = record["plan"].get("details", {})
    metric = details.get("block_metric")
    sparsity = block_sparsity(record)
    rows = 2 if metric else 1
    fig, axes = subplots(rows, 1, figsize=(10, 3.2 * rows), squeeze=False)
    blocks = list(sparsity)
    axes[0][0].bar(blocks, [100 * sparsity[b] for b in blocks], color="tab:blue")
    axes[0][0].axhline(100 * record["plan"]["budget"]["sparsity"], color="black", linestyle="--", label="budget")
    axes[0][0].set_ylabel("sparsity (%)")
    axes[0][0].legend()
    title = f"{record['model']['spec']}: {record['plan']['method']} / {record['plan']['allocator']}"
    axes[0][0].set_title(f"{title}, PPL {record['metrics']['ppl']:.2f}")
    if metric:
        values = {int(k): float(v) for k, v in metric.items()}
        axes[1][0].bar(list(values), list(values.values()), color="tab:orange")
        axes[1][0].set_ylabel(details.get("metric", "metric"))
    axes[-1][0].set_xlabel("decoder block")
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
