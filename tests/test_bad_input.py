"""Bad input of every kind ends with one sentence on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_cli import QUICK, invoke, leftovers


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    if not run.exists():
        assert invoke("compress", "--model", "tiny-llama", "--out", str(run), *QUICK).exit_code == 0
    return run


def _damaged(tmp_path: Path, name: str, damage) -> list[str]:
    run = _run_dir(tmp_path)
    path = run / name
    path.write_bytes(damage(path.read_bytes()))
    return ["eval", "--model", str(run)]


def _text(tmp_path: Path, data: bytes, option: str = "--eval-text") -> list[str]:
    path = tmp_path / "text.txt"
    path.write_bytes(data)
    return ["compress", "--model", "tiny-llama", option, str(path)]


def _gguf(tmp_path: Path, truncate: bool) -> list[str]:
    import layerwise
    from layerwise.export import export_gguf

    path = export_gguf(layerwise.load("tiny-llama"), tmp_path / "m.gguf", "f16").path
    data = open(path, "rb").read()
    Path(path).write_bytes(data[: len(data) // 2] if truncate else b"\x00" * 64)
    return ["eval", "--model", path]


def _plan_edit(tmp_path: Path, edit) -> list[str]:
    plan_file = tmp_path / "plan.json"
    assert invoke("plan", "--model", "tiny-llama", "--out", str(plan_file)).exit_code == 0
    plan = json.loads(plan_file.read_text())
    edit(plan)
    plan_file.write_text(json.dumps(plan))
    return ["apply", "--model", "tiny-llama", "--plan", str(plan_file)]


def _other_weights(plan: dict) -> None:
    plan["weights"] = "0" * 20


def _empty_directory(tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir()
    return ["eval", "--model", str(tmp_path / "empty")]


def _bare_gguf(tmp_path: Path, architecture: str | None) -> list[str]:
    """A GGUF holding metadata only: of an architecture nobody supports, or without general.architecture."""
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), architecture or "llama")
    if architecture is None:
        writer.kv_data[0].pop("general.architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ["eval", "--model", str(path)]


def _unadapted_family(tmp_path: Path, structure: list[str]) -> list[str]:
    """A tiny OPT directory (a family without a structural adapter), with the tiny model's tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    import layerwise

    path = tmp_path / "opt"
    config = OPTConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=128, word_embed_proj_dim=32)
    OPTForCausalLM(config).save_pretrained(path)
    layerwise.load("tiny-llama").tokenizer.save_pretrained(path)
    return ["compress", "--model", str(path), *structure]


def _unencodable(tokenizer_json: bytes) -> bytes:
    """A tokenizer that loads but cannot encode: a word-level vocabulary whose unknown token is missing."""
    definition = json.loads(tokenizer_json)
    definition["model"] = {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "[UNK]"}
    return json.dumps(definition).encode()


def _other_size(plan: dict) -> None:
    plan["architecture"]["hidden_size"] = 128


def _no_architecture(plan: dict) -> None:
    plan["architecture"] = {}


QUANT = ["compress", "--model", "tiny-llama", "--structure", "quant"]
DEPTH = ["compress", "--model", "tiny-llama", "--structure", "depth", "--allocator", "drop-last"]
SPRINT = ["compress", "--model", "tiny-llama", "--structure", "depth", "--allocator", "sprint",
          "--num-remove-sublayers", "1"]
WIDTH = ["compress", "--model", "tiny-llama", "--structure", "width"]
RL = [*QUANT, "--allocator", "automp-rl", "--bits", "3,4,8", "--avg-bits", "4.5"]

CASES = {
    "truncated model.safetensors": (lambda p: _damaged(p, "model.safetensors", lambda b: b[: len(b) // 3]),
                                    "Cannot load the model directory"),
    "corrupt layerwise.json": (lambda p: _damaged(p, "layerwise.json", lambda b: b"{not json"),
                               "layerwise.json is not valid JSON"),
    "corrupt tokenizer.json": (lambda p: _damaged(p, "tokenizer.json", lambda b: b"{not json"),
                               "Cannot load the tokenizer of"),
    "tokenizer that cannot encode": (lambda p: _damaged(p, "tokenizer.json", _unencodable),
                                     "cannot encode the text: WordLevel error: Missing [UNK] token"),
    "truncated gguf": (lambda p: _gguf(p, True), "truncated or corrupt"),
    "corrupt gguf": (lambda p: _gguf(p, False), "truncated or corrupt"),
    "plan for other sizes": (lambda p: _plan_edit(p, _other_size), "hidden_size=128"),
    "plan without architecture": (lambda p: _plan_edit(p, _no_architecture), "records no architecture"),
    "plan for other weights": (lambda p: _plan_edit(p, _other_weights), "The plan was computed on other weights"),
    "directory without config.json": (_empty_directory, "neither a directory with config.json"),
    "gguf of an unsupported architecture": (lambda p: _bare_gguf(p, "foo"), "architecture foo is not supported"),
    "gguf without general.architecture": (lambda p: _bare_gguf(p, None), "has no general.architecture"),
    "width on an unadapted family": (lambda p: _unadapted_family(p, ["--structure", "width", "--pruning-ratio", "0.2"]),
                                     "Structural compression does not support model type 'opt'"),
    "depth on an unadapted family": (lambda p: _unadapted_family(p, ["--structure", "depth", "--allocator", "sleb",
                                                                     "--num-remove-sublayers", "1"]),
                                     "Structural compression does not support model type 'opt'"),
    "non-UTF-8 text": (lambda p: _text(p, b"caf\xe9 \xff\xfe plain"), "is not UTF-8 text"),
    "empty text": (lambda p: _text(p, b""), "is empty"),
    "text shorter than a window": (lambda p: _text(p, b"a few words only"), "fewer than one window"),
    "empty calibration text": (lambda p: _text(p, b"   \n", "--calib-text"), "is empty"),
    "bits 1": (lambda p: [*QUANT, "--bits", "1"], "--bits must lie between 2 and 8"),
    "bits 0": (lambda p: [*QUANT, "--bits", "0"], "--bits must lie between 2 and 8"),
    "bits a": (lambda p: [*QUANT, "--bits", "a"], "--bits must be integers between 2 and 8 or GGUF types"),
    "avg-bits 0": (lambda p: [*QUANT, "--allocator", "greedy", "--bits", "3,4", "--avg-bits", "0"],
                   "--avg-bits must lie in (0, 16]"),
    "avg-bits -1": (lambda p: [*QUANT, "--allocator", "greedy", "--bits", "3,4", "--avg-bits", "-1"],
                    "--avg-bits must lie in (0, 16]"),
    "avg-bits 17": (lambda p: [*QUANT, "--allocator", "greedy", "--bits", "3,4", "--avg-bits", "17"],
                    "--avg-bits must lie in (0, 16]"),
    "negative group size": (lambda p: [*QUANT, "--group-size", "-4"], "--group-size must be 0 (per channel) or"),
    "remove 0 sublayers": (lambda p: [*DEPTH, "--num-remove-sublayers", "0"], "--num-remove-sublayers must be at least 1"),
    "remove more sublayers than exist": (lambda p: [*DEPTH, "--num-remove-sublayers", "99"],
                                         "cannot remove 99 sublayers"),
    "sprint direction": (lambda p: [*SPRINT, "--direction", "sideways"], "--direction must be one of out_channel"),
    "sprint negative damping": (lambda p: [*SPRINT, "--damping-coefficient", "-1"],
                                "--damping-coefficient must be >= 0"),
    "pruning ratio 0": (lambda p: [*WIDTH, "--pruning-ratio", "0"], "--pruning-ratio must lie in (0, 1)"),
    "pruning ratio 1": (lambda p: [*WIDTH, "--pruning-ratio", "1"], "--pruning-ratio must lie in (0, 1)"),
    "max windows 0": (lambda p: ["compress", "--model", "tiny-llama", "--max-windows", "0"],
                      "Invalid --max-windows"),
    "seqlen 1": (lambda p: ["compress", "--model", "tiny-llama", "--seqlen", "1"], "Invalid --seqlen"),
    "episodes 0": (lambda p: [*RL, "--episodes", "0"], "--episodes and --seeds of at least 1"),
    "seeds 0": (lambda p: [*RL, "--seeds", "0"], "--episodes and --seeds of at least 1"),
    "eval speedups abc": (lambda p: [*DEPTH, "--target-speedup", "1.2", "--eval-speedups", "abc"],
                          "--eval-speedups must be numbers"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(tmp_path, case):
    build, message = CASES[case]
    args = build(tmp_path)
    out = tmp_path / "out"
    extra = [] if args[0] == "apply" and "--out" in args else ["--out", str(out)]
    quick = [] if "--seqlen" in args or "--max-windows" in args else QUICK
    result = invoke(*args, *extra, *quick)
    assert result.exit_code == 2, result.output
    stderr = " ".join(result.stderr.split())
    assert message in stderr, stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def _one_sentence(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output


def test_a_disk_that_refuses_a_write_is_one_sentence_and_leaves_nothing(tmp_path):
    """A real refusal from the kernel: a file-size limit (EFBIG, as a full disk's ENOSPC) far below the GGUF
    file's size, in a process of its own."""
    import resource
    import signal
    import subprocess
    import sys

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    out = tmp_path / "tiny.gguf"
    script = "import sys; from layerwise.cli import app; sys.exit(app())"
    done = subprocess.run([sys.executable, "-c", script, "export", "tiny-llama", "--out", str(out)],
                          capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert done.returncode == 2, done.stderr
    stderr = " ".join(done.stderr.split())
    # (the GGUF writer's numpy drops the errno of a short write; the sentence says what happened instead)
    assert f"Could not write {out}: the disk took only part of a write" in stderr, stderr
    assert "nothing was left there" in stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_saving_a_run_leaves_no_directory(tmp_path, monkeypatch):
    import errno
    import os

    import layerwise.pipeline as pipeline

    def disk_full(loaded, directory, plan):
        (Path(directory) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr(pipeline, "save", disk_full)
    out = tmp_path / "out"
    _one_sentence(invoke("compress", "--model", "tiny-llama", "--out", str(out), *QUICK),
                  f"Could not write {out}: No space left on device")
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_output_folder_without_write_permission_is_refused_before_any_work(tmp_path, monkeypatch):
    """(Tests run as root here, which may write anywhere: the permission answer is the one a user would get.)"""
    import os

    import layerwise.cache as cache
    import layerwise.pipeline as pipeline

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(cache.os, "access", lambda path, mode: Path(path) != locked and os.access(path, mode))
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    out = locked / "new" / "run"
    _one_sentence(invoke("compress", "--model", "tiny-llama", "--out", str(out), *QUICK),
                  f"Cannot write {out}: {locked} is not a folder this user may write into")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("device", ["RAM", "GPU"])
def test_running_out_of_memory_is_one_sentence_and_writes_nothing(tmp_path, monkeypatch, device):
    import torch

    import layerwise.pipeline as pipeline

    def out_of_memory(*args, **kwargs):
        if device == "GPU":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        torch.empty(1 << 50, dtype=torch.uint8)  # a real allocation failure of PyTorch's CPU allocator (1 PiB)

    monkeypatch.setattr(pipeline, "apply_plan", out_of_memory)
    out = tmp_path / "out"
    _one_sentence(invoke("compress", "--model", "tiny-llama", "--out", str(out), *QUICK),
                  f"Out of {device} memory; nothing was written. Try a smaller --batch-size")
    assert not out.exists() and leftovers(tmp_path) == []


def test_plan_out_onto_an_existing_file_is_refused(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text("mine")
    result = invoke("plan", "--model", "tiny-llama", "--out", str(plan_file))
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    assert plan_file.read_text() == "mine"


def test_ctrl_c_during_compress_exits_130_with_no_output_and_intact_caches(tmp_path, monkeypatch, isolated_cache):
    import layerwise.pipeline as pipeline

    real_apply = pipeline.apply_plan

    def interrupted(*args, **kwargs):
        real_apply(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "apply_plan", interrupted)
    out = tmp_path / "out"
    result = invoke("compress", "--model", "tiny-llama", "--method", "wanda", "--out", str(out), *QUICK)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []
    partial = [p for p in isolated_cache.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert partial == []
    monkeypatch.setattr(pipeline, "apply_plan", real_apply)
    again = invoke("compress", "--model", "tiny-llama", "--method", "wanda", "--out", str(out), *QUICK)
    assert again.exit_code == 0, again.output  # the caches written before the interruption still read


def test_server_refuses_what_it_cannot_serve_and_stays_dense_under_load(tiny, calibration):
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from fastapi.testclient import TestClient

    from layerwise.runtime.server import MAX_WAITING, create_app
    from layerwise.runtime.session import RuntimeEnvironment

    env = RuntimeEnvironment(tiny, calibration, 0)
    client = TestClient(create_app(env, None))
    with torch.no_grad():
        dense = tiny.model(torch.tensor([[5, 6, 7]])).logits
    too_many = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 100_000})
    assert too_many.status_code == 422
    too_long = client.post("/generate", json={"prompt": "x" * 3000, "max_new_tokens": 8})
    assert too_long.status_code == 422 and "exceeds the model's context" in too_long.json()["detail"]
    not_json = client.post("/generate", content=b"{prompt: hi", headers={"content-type": "application/json"})
    assert not_json.status_code == 422
    observe = env.observe

    def slow_observe(*args, **kwargs):  # each request holds the model 0.3 s: 32 at once overflow the queue
        time.sleep(0.3)
        return observe(*args, **kwargs)

    env.observe = slow_observe
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda i: client.post("/generate", json={"prompt": f"question {i}?",
                                                                          "max_new_tokens": 4}).status_code,
                                 range(32)))
    env.observe = observe
    # at most MAX_WAITING requests are admitted at once; the rest are refused with 503, never queued without bound
    assert set(statuses) == {200, 503}, statuses
    assert 1 <= statuses.count(200) <= MAX_WAITING + 2 and statuses.count(503) >= 32 - MAX_WAITING - 2
    assert env.profiles.active.name == "none"
    with torch.no_grad():
        assert torch.equal(tiny.model(torch.tensor([[5, 6, 7]])).logits, dense)


def test_a_controller_checkpoint_from_another_model_is_refused(tmp_path, tiny):
    from layerwise.runtime.controller import Controller, DqnSettings
    from layerwise.runtime.profiles import default_specs

    names = [spec.name for spec in default_specs()]
    checkpoint = tmp_path / "other.pt"
    Controller(30, names, DqnSettings()).save(checkpoint, {
        "reward": {}, "model": {"spec": "smollm2-135m", "architecture": {"model_type": "llama", "num_blocks": 30,
                                                                         "hidden_size": 576}}})
    result = invoke("runtime", "test", "--model", "tiny-llama", "--checkpoint", str(checkpoint),
                    "--ppl-samples", "1", "--train-samples", "1", "--nsamples", "2", "--load-profile", "idle")
    assert result.exit_code == 2 and "was trained on smollm2-135m" in result.stderr
