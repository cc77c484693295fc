"""Shared fixtures: a private cache directory per test session and the tiny random Llama; an unexpected skip
fails the session (in CI, ``LAYERWISE_STRICT_SKIPS=1``, any skip outside ``ALLOWED_SKIPS``)."""

from __future__ import annotations

import os

import pytest
import torch

import layerwise


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test session starts from an empty LAYERWISE_CACHE, as a fresh machine would."""
    path = tmp_path_factory.mktemp("layerwise-cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("LAYERWISE_CACHE", str(path))
    yield path
    patcher.undo()


@pytest.fixture
def tiny() -> layerwise.LoadedModel:
    return layerwise.load("tiny-llama")


@pytest.fixture
def memory_bound_llamacpp(monkeypatch):
    """llama.cpp on a memory-bound machine: a decode step takes the stored bytes of the decoder's GGUF linears
    (every linear of a typed probe is one) in microseconds, the same in every run, so a typed table measures
    exactly what it predicts; the paired timing is the library's own report of those runs."""
    import layerwise.engines  # noqa: F401  (registers the real engine first, so the patch replaces it)
    from layerwise.cost import latency_table
    from layerwise.cost.latency import paired_report
    from layerwise.ops.gguf_quant import GGUFLinear

    def decode_seconds(loaded) -> float:
        return sum(m.qdata.numel() for m in loaded.model.modules() if isinstance(m, GGUFLinear)) / 1e6

    def paired(reference, model, setting, outtype="f16", embedding_type=None):
        runs = tuple([(1e-3, decode_seconds(m) * setting.decode_steps)] * setting.repeats for m in (reference, model))
        return paired_report(setting, runs, "memory-bound llama.cpp", 1)

    monkeypatch.setitem(latency_table.PAIRED_LATENCY._items, "llama.cpp", paired)
    return decode_seconds


@pytest.fixture
def tokens() -> torch.Tensor:
    """A fixed batch of byte tokens for logit comparisons."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 24), generator=generator)


@pytest.fixture
def neox_dir(tmp_path) -> str:
    """A tiny GPT-NeoX (fused per-head qkv, parallel residual), saved as a HF directory."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from layerwise.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512)
    path = tmp_path / "neox"
    GPTNeoXForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def unadapted_dir(tmp_path) -> str:
    """A tiny OPT: a decoder family no adapter describes (blocks still built from nn.Linear), saved as a HF
    directory."""
    from transformers import OPTConfig, OPTForCausalLM

    from layerwise.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=258, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=257, bos_token_id=256,
                       eos_token_id=256)
    path = tmp_path / "opt"
    OPTForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def calibration(tiny):
    """A CalibrationSource on the wiki calibration split: 8 windows of 64 tokens."""
    from layerwise.calibration import CalibrationSource

    return CalibrationSource(tiny, layerwise.RunSettings(nsamples=8, seqlen=64, calib_batch_size=3))


# Reasons a test may be skipped even in CI (substrings of the skip message). Empty: in CI everything runs.
ALLOWED_SKIPS: tuple[str, ...] = ()
# Outside CI, skips that depend on what the machine has installed rather than on the code (.ci/run installs it).
ALLOWED_LOCALLY: tuple[str, ...] = ("headless Chromium not installed",)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """An unexpected skip turns a green run red: by default every skip outside ``ALLOWED_LOCALLY``, under
    ``LAYERWISE_STRICT_SKIPS=1`` (CI) every skip outside ``ALLOWED_SKIPS``; ``LAYERWISE_STRICT_SKIPS=0`` allows
    all skips."""
    mode = os.environ.get("LAYERWISE_STRICT_SKIPS")
    if mode == "0":
        return
    allowed = ALLOWED_SKIPS if mode == "1" else ALLOWED_SKIPS + ALLOWED_LOCALLY
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    unexpected = [report for report in skipped
                  if not any(reason in str(report.longrepr) for reason in allowed)]
    if unexpected:
        for report in unexpected:
            print(f"\nnot allowed to skip: {report.nodeid}: {report.longrepr}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
