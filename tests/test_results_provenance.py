"""Benchmark results record what they were measured with."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def test_results_sections_and_json_carry_their_provenance(tmp_path, monkeypatch):
    """Every section ends with the commit, tree state, machine and versions it was measured with; its JSON holds
    the same facts beside the data, and reading it back gives the data (older files: the data alone)."""
    from benchmark_scripts import benchmark_module

    table = benchmark_module("results_table")
    monkeypatch.setattr(table, "HERE", tmp_path)
    monkeypatch.setattr(table, "RESULTS_MD", tmp_path / "RESULTS.md")
    table.write_section("healing", "## Healing\n\nrows\n", {"rows": {"a": 1}})
    text = (tmp_path / "RESULTS.md").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    assert f"Measured at commit {commit[:10]}" in text and "torch 2." in text and "CPUs" in text
    stored = json.loads((tmp_path / "results" / "healing.json").read_text())
    assert stored["provenance"]["commit"] == commit and isinstance(stored["provenance"]["dirty"], bool)
    assert stored["provenance"]["machine"]["cpu_model"]
    assert table.read_results("healing") == {"rows": {"a": 1}}
    (tmp_path / "results" / "old.json").write_text('{"rows": {}}')
    assert table.read_results("old") == {"rows": {}}


def test_an_unexpected_skip_fails_make_test_by_default(monkeypatch):
    """By default a skip fails the session unless it is a missing-browser skip; CI allows none; 0 allows all."""
    from types import SimpleNamespace

    import pytest

    import conftest

    def finish(reason: str, mode: str | None) -> object:
        if mode is None:
            monkeypatch.delenv("LAYERWISE_STRICT_SKIPS", raising=False)
        else:
            monkeypatch.setenv("LAYERWISE_STRICT_SKIPS", mode)
        report = SimpleNamespace(nodeid="tests/test_x.py::test_y", longrepr=("test_x.py", 1, f"Skipped: {reason}"))
        reporter = SimpleNamespace(stats={"skipped": [report]})
        session = SimpleNamespace(config=SimpleNamespace(pluginmanager=SimpleNamespace(get_plugin=lambda name: reporter)),
                                  exitstatus=pytest.ExitCode.OK)
        conftest.pytest_sessionfinish(session, 0)
        return session.exitstatus

    browser = "headless Chromium not installed (CI installs it)"
    assert finish("no data set", None) == pytest.ExitCode.TESTS_FAILED
    assert finish(browser, None) == pytest.ExitCode.OK
    assert finish(browser, "1") == pytest.ExitCode.TESTS_FAILED
    assert finish("no data set", "0") == pytest.ExitCode.OK
