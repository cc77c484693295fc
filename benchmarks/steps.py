"""Resumable benchmark steps that can outlive the machine they started on.

A benchmark longer than a working session is run as named steps. Each finished step is written, with where it was
measured (commit, tree state, machine, versions), to DIR/state.json and, when the run is carried, to
results/NAME.carried.json, which is committed while the run spans sessions. `--resume` continues from DIR, or from
the carried file when DIR was lost with its machine; a carried step is taken only if it was measured on a machine
like this one (same CPU model, core count, instruction sets, torch and llama.cpp), since its timings are compared
with this machine's. Each step also records the share of the CPUs other processes used while it ran
(``other_cpu_share``): a step timed on a shared machine is measured again on resume. Writing the finished section
removes the carried file.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from results_table import HERE, provenance

from layerwise.runtime.telemetry import Telemetry

COMPARABLE_MACHINE = ("cpu_model", "cpu_count", "cpu_features")
# a step during which other processes used more than this share of the CPUs timed a shared machine: measured again
BUSY_SHARE = 0.1
COMPARABLE_VERSIONS = ("torch", "llama_cpp_python")


def busy(record: dict[str, Any]) -> bool:
    """Whether other processes used more than ``BUSY_SHARE`` of the CPUs while the step ran (unrecorded: no)."""
    return record.get("measured", {}).get("other_cpu_share", 0.0) > BUSY_SHARE


def _shared_machine(record: dict[str, Any]) -> str:
    return f"other processes used {100 * record['measured']['other_cpu_share']:.0f}% of the CPUs while it ran"


def comparable(measured: dict[str, Any], here: dict[str, Any]) -> bool:
    """Whether a step measured with provenance ``measured`` may sit in one table with steps measured ``here``."""
    return (all(measured["machine"].get(k) == here["machine"].get(k) for k in COMPARABLE_MACHINE)
            and all(measured["versions"].get(k) == here["versions"].get(k) for k in COMPARABLE_VERSIONS))


class Steps:
    """The finished steps of one benchmark run, keyed by name; ``run`` computes a step once."""

    def __init__(self, name: str, out: Path, resume: bool, carry: bool = True) -> None:
        self.out = out
        self.carried = HERE / "results" / f"{name}.carried.json" if carry else None
        self.here = provenance()
        self.state: dict[str, Any] = {}
        local = out / "state.json"
        if resume and local.is_file():
            self.state = json.loads(local.read_text())
        if resume and self.carried is not None and self.carried.is_file():
            for key, record in json.loads(self.carried.read_text())["steps"].items():
                if key in self.state:
                    continue
                if comparable(record["measured"], self.here):
                    self.state[key] = record
                    print(f"{key}: carried from commit {record['measured']['commit'][:10]}", flush=True)
                else:
                    print(f"{key}: measured on another machine ({record['measured']['machine'].get('cpu_model')}), "
                          "measured again", flush=True)

        for key in [key for key, record in self.state.items() if busy(record)]:
            print(f"{key}: {_shared_machine(self.state.pop(key))}, measured again", flush=True)

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.state[key]

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def run(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The step's record: computed now (timed, stamped and saved) unless it already finished."""
        if key not in self.state:
            started, telemetry = time.perf_counter(), Telemetry(children_are_own=True)
            record = compute()
            record["bench_s"] = round(time.perf_counter() - started, 1)
            record["measured"] = {**self.here, "finished": time.strftime("%Y-%m-%d %H:%M"),
                                  "other_cpu_share": round(telemetry.external_cpu(), 3)}
            if busy(record):
                print(f"{key}: {_shared_machine(record)}: its timings are not this machine's alone; --resume "
                      "measures it again", flush=True)
            self.state[key] = record
            self._save()
            print(f"{key}: done in {record['bench_s']} s", flush=True)
        return self.state[key]

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "state.json").write_text(json.dumps(self.state, indent=2, default=str))
        if self.carried is not None:
            self.carried.parent.mkdir(exist_ok=True)
            self.carried.write_text(json.dumps({"steps": self.state}, indent=2, default=str) + "\n")

    def finish(self) -> None:
        """The section is written: the carried file has served."""
        if self.carried is not None:
            self.carried.unlink(missing_ok=True)

    def provenance_remark(self) -> str:
        """A sentence naming the commits the steps were measured at (empty when all were measured at this one
        commit, which the section's provenance line names), and whether the library code differs between them."""
        commits = Counter(record.get("measured", {}).get("commit", "unrecorded") for record in self.state.values())
        dirty = {record["measured"]["commit"] for record in self.state.values() if record.get("measured", {}).get("dirty")}
        if set(commits) == {self.here["commit"]}:
            return ""
        listed = ", ".join(f"{c[:10]}{' with uncommitted changes' if c in dirty else ''} ({n} steps)"
                           for c, n in commits.most_common())
        diffs = [_git("diff", "--name-only", c, self.here["commit"], "--", "src") for c in commits]
        changed = sorted({line for diff in diffs if diff for line in diff.splitlines()})
        if any(diff is None for diff in diffs):
            code = "how the library code differs between them is unknown (a commit is not in this repository)"
        elif changed:
            named = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more files" if len(changed) > 6 else "")
            code = f"the library code differs between them in {named}"
        else:
            code = "the library code (src/) is the same at each"
        return f"Steps were measured at commits {listed}; {code}."


def _git(*args: str) -> str | None:
    """git's output, or None when it fails (e.g. an unknown commit)."""
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
