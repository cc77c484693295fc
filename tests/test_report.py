"""The comparison report across runs: table, Pareto plots, allocations; HTML checked in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.report import pareto_front, summarize

QUICK = ["--seqlen", "64", "--max-windows", "2", "--prompt-length", "16", "--generation-length", "4"]
TASKS = ["--tasks", "arc_easy,winogrande", "--limit", "4"]
runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """A dense evaluation and two compressed runs of tiny-llama, each with zero-shot scores and latency."""
    root = tmp_path_factory.mktemp("runs")
    commands = {
        "dense": ["eval", "--model", "tiny-llama"],
        "magnitude50": ["compress", "--model", "tiny-llama", "--sparsity", "0.5"],
        "wanda-owl60": ["compress", "--model", "tiny-llama", "--method", "wanda", "--allocator", "owl",
                        "--sparsity", "0.6", "--nsamples", "4", "--separate-latency"],
    }
    for name, command in commands.items():
        result = invoke(*command, "--out", str(root / name), *QUICK, *TASKS)
        assert result.exit_code == 0, result.output
    return [root / name for name in commands]


def test_runs_record_zero_shot_latency_and_speedup(runs):
    record = json.loads((runs[1] / "result.json").read_text())
    metrics = record["metrics"]
    assert set(metrics["zeroshot"]["scores"]) == {"arc_easy", "winogrande"}
    assert metrics["zeroshot"]["protocol"]["limit"] == 4
    assert metrics["latency"]["prefill_ms"] > 0 and metrics["dense"]["latency"]["prefill_ms"] > 0
    assert metrics["latency"]["setting"]["prompt_length"] == 16 and record["settings"]["latency"]["paired"]
    assert set(metrics["speedup"]) == {"total", "prefill", "decode"} and metrics["speedup"]["total"] > 0
    assert record["timings"]["latency_s"] > 0 and record["timings"]["dense_latency_s"] < 0.01  # timed in pairs
    separate = json.loads((runs[2] / "result.json").read_text())["metrics"]  # --separate-latency: before / after
    assert separate["speedup"]["prefill"] == pytest.approx(
        separate["dense"]["latency"]["prefill_ms"] / separate["latency"]["prefill_ms"], rel=1e-3)


def test_markdown_report_has_one_row_per_run(runs, tmp_path):
    out = tmp_path / "report.md"
    result = invoke("report", *map(str, runs), "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| run | plan | PPL | mean KLD | 99.9% KLD | same top (%) | arc_easy (acc_norm, %) | "
                               "winogrande (acc, %) |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| dense", "| magnitude50", "| wanda-owl60"]
    # the compressed runs carry their KL divergence to the dense model; the eval run has no reference
    assert lines[2].split(" | ")[3] == "–" and float(lines[3].split(" | ")[3]) > 0
    assert "magnitude / uniform (sparsity 0.5)" in lines[3] and "as loaded (eval)" in lines[2]


def test_html_report_embeds_table_and_images(runs, tmp_path):
    out = tmp_path / "report.html"
    assert invoke("report", *map(str, runs), "--out", str(out)).exit_code == 0
    page = out.read_text()
    assert page.count("<tr>") == 4 and 'id="comparison"' in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # the Pareto figure and the two compressed runs' allocation maps
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert "src=\"http" not in page and "<link" not in page  # self-contained


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("LAYERWISE_REQUIRE_BROWSER"),
                    reason="headless Chromium not installed (CI installs it)")
def test_html_report_renders_in_headless_chromium(runs, tmp_path):
    assert CHROMIUM, "LAYERWISE_REQUIRE_BROWSER is set but chromium is not installed"
    out = tmp_path / "report.html"
    assert invoke("report", *map(str, runs), "--out", str(out)).exit_code == 0
    probe = tmp_path / "probe.html"  # the report plus a script recording what the browser actually decoded
    probe.write_text(out.read_text() + """<script>window.addEventListener('load', () => {
      const images = [...document.images];
      document.body.dataset.images = images.filter(i => i.complete && i.naturalWidth > 0).length + '/' + images.length;
      document.body.dataset.rows = document.querySelectorAll('#comparison tbody tr').length;
      document.body.dataset.cells = document.querySelectorAll('#comparison tbody td').length;
    });</script>""")
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images="3/3"' in body and 'data-rows="3"' in body
    assert 'data-cells="45"' in body  # 3 runs x 15 columns


def test_single_run_report_defaults_into_its_directory_and_png_draws_allocation(runs):
    assert invoke("report", str(runs[2])).exit_code == 0
    assert (runs[2] / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert invoke("report", str(runs[2]), "--format", "png").exit_code == 0
    assert (runs[2] / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "pdf"], "Unknown report format 'pdf'"),
        (["--format", "png", "--out", "/nonexistent/allocation.png"], "draws one run's allocation"),
        ([], "Pass --out FILE when comparing several runs"),
    ],
)
def test_report_errors_are_one_sentence(runs, args, message):
    result = invoke("report", str(runs[0]), str(runs[1]), *args)
    assert result.exit_code == 2 and message in result.stderr


def test_summary_reads_measured_figures(runs):
    summary = summarize(runs[1])
    assert summary.label == "magnitude / uniform (sparsity 0.5)" and summary.ppl > 1
    assert summary.nonzero_parameters < summary.parameters and summary.measured_speedup > 0
    assert summarize(runs[0]).measured_speedup is None


def test_pareto_front_keeps_undominated_points():
    points = [(1.0, 5.0), (2.0, 3.0), (2.5, 4.0), (3.0, 1.0), (3.0, 2.0)]
    assert pareto_front(points) == [0, 1, 3]


def test_pareto_plot_leaves_out_an_axis_no_run_measured():
    """Runs made with --no-latency have no latency: the figure has two panels, not an empty third one."""
    import io

    import matplotlib.image as mpimg

    from layerwise.report.figures import pareto_plot
    from layerwise.report.tables import RunSummary

    def run(name: str, ppl: float, prefill: float | None) -> RunSummary:
        return RunSummary(name=name, record={}, label=name, ppl=ppl, parameters=100, nonzero_parameters=50,
                          weight_bytes=400, prefill_ms=prefill, decode_tokens_per_s=None, predicted_speedup=None,
                          measured_speedup=None)

    def width(runs: list[RunSummary]) -> int:
        return mpimg.imread(io.BytesIO(pareto_plot(runs)), format="png").shape[1]

    without = width([run("a", 10.0, None), run("b", 12.0, None)])
    with_latency = width([run("a", 10.0, 5.0), run("b", 12.0, 4.0)])
    assert without < 0.75 * with_latency  # two panels of three
