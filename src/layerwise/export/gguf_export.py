"""Write a (compressed) Llama-family model as a GGUF file that llama.cpp runs.

- Uniform shapes go out as architecture ``llama``; per-layer widths or removed sublayers as ``deci``, with
  per-layer head counts, KV head counts and FFN lengths (0 = removed).
- llama.cpp's ``deci`` graph skips a layer whose FFN length is 0 *before* adding the attention residual, so a
  layer that keeps its attention but lost its MLP would silently lose its attention too; such a layer gets a
  one-channel FFN with zero weights (output exactly 0). Layer 0's head count also sets the head size of every
  layer, so a removed layer-0 attention becomes one head with zero weights.
- GGUF-quantized linears are written byte for byte as they are stored; float linears as ``outtype``
  (f32, f16, bf16, or any GGUF type, quantized here by the real quantizer). Masked sparsity is stored dense:
  llama.cpp has no sparse kernels, so zeros save neither bytes nor time there.
- q and k rows are permuted to llama.cpp's rotary layout, as its own converter does.
- The tokenizer is copied from the source GGUF when the model came from one, otherwise written from the
  Hugging Face tokenizer with gguf's vocabulary helpers.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab
from pydantic import BaseModel
from torch import nn

from ..cache import atomic_path
from ..errors import ExportError, OutputExistsError, UnsupportedArchitectureError
from ..gguf import GGUFType, gguf_type, stored_type
from ..gguf.quantize import quantize_matrix
from ..gguf.tokenizer import HF_TOKENIZER_KEY
from ..models import decoder_linears
from ..models.adapter import ModelAdapter, get_adapter
from ..models.loading import NAMED_GGUF, LoadedModel
from ..ops.gguf_quant import GGUFLinear
from .families import GGUFFamily, gguf_family, rope_dimensions, rotary_rows, tensor_name_map

LINEAR_NAMES = {("attention", "q"): "attn_q", ("attention", "k"): "attn_k", ("attention", "v"): "attn_v",
                ("attention", "o"): "attn_output", ("mlp", "gate"): "ffn_gate", ("mlp", "up"): "ffn_up",
                ("mlp", "down"): "ffn_down"}
FLOAT_TYPES = ("f32", "f16", "bf16")


class ExportReport(BaseModel):
    """What was written: the file, its architecture, bytes and per-type tensor counts, and what to know."""

    path: str
    architecture: str
    file_bytes: int
    tensor_bytes: int
    tensor_types: dict[str, int]
    linear_types: dict[str, str]
    layer_dims: dict[str, list[int]]
    tokenizer_from: str
    notes: list[str]


@dataclass
class BlockShape:
    """One block as llama.cpp will see it; ``*_stub`` marks a zero-weight stand-in for a removed sublayer."""

    heads: int
    kv_heads: int
    ffn: int
    attention_stub: bool = False
    mlp_stub: bool = False

    @classmethod
    def of(cls, index: int, heads: int, kv_heads: int, ffn: int) -> "BlockShape":
        """Block ``index`` with ``heads`` query heads (0: attention removed) and an FFN of ``ffn`` (0: MLP removed),
        stubs where llama.cpp needs them: a removed layer-0 attention, a removed MLP beside a kept attention."""
        if heads == 0:
            shape = cls(1, 1, 0, attention_stub=True) if index == 0 else cls(0, 0, 0)
        else:
            shape = cls(heads, kv_heads, 0)
        if ffn:
            shape.ffn = ffn
        elif heads:
            shape.ffn, shape.mlp_stub = 1, True
        return shape

    @property
    def norms(self) -> int:
        """f32 norm vectors the block writes (one per present or stubbed sublayer)."""
        return (self.heads > 0) + (self.ffn > 0)

    def stub_bytes(self, hidden: int, head_dim: int) -> int:
        """Bytes of the block's zero-weight f32 stand-in matrices."""
        matrices = ([*attention_stub_shapes(hidden, head_dim).values()] if self.attention_stub else []) + \
            ([*mlp_stub_shapes(hidden).values()] if self.mlp_stub else [])
        return 4 * sum(rows * columns for rows, columns in matrices)


def attention_stub_shapes(hidden: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """(rows, columns) of the one-head zero attention written for a removed layer-0 attention."""
    return {"q": (head_dim, hidden), "k": (head_dim, hidden), "v": (head_dim, hidden), "o": (hidden, head_dim)}


def mlp_stub_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    """(rows, columns) of the one-channel zero FFN written for a removed MLP beside a kept attention."""
    return {"gate": (1, hidden), "up": (1, hidden), "down": (hidden, 1)}


def check_exportable(model: nn.Module) -> ModelAdapter:
    """The model's adapter, or an ``ExportError`` saying why llama.cpp cannot run this model as exported."""
    config = getattr(model, "config", None)
    family = gguf_family(config)
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError as exc:
        raise ExportError(f"GGUF export cannot read this model's structure: {exc}") from None
    if family.architecture == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ExportError("GGUF export does not write linear biases; this Llama model has attention or MLP biases.")
    rope = _rope_scaling(config)
    allowed = (None, "default", "linear", "llama3") if family.architecture == "llama" else (None, "default", "linear")
    if rope and rope.get("rope_type", rope.get("type")) not in allowed:
        raise ExportError(f"GGUF export of the {config.model_type} family supports "
                          f"{', '.join(str(kind) for kind in allowed[1:])} RoPE; this model uses "
                          f"'{rope.get('rope_type', rope.get('type'))}'.")
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            raise ExportError(f"{name} is stored on layerwise's own {module.bits}-bit grid, which GGUF cannot "
                              "express; quantize with GGUF types (e.g. --bits q4_k,q6_k,q8_0) to export.")
    shapes = block_shapes(adapter)
    hidden, head_dim = int(config.hidden_size), adapter.head_dim(None)
    check_structure_exportable(model, removes=any(s.heads == 0 or s.ffn == 0 or s.attention_stub or s.mlp_stub
                                                  for s in shapes),
                               per_layer=not _uniform(shapes) and all(s.heads and s.ffn for s in shapes),
                               narrows_attention=any(s.heads * head_dim != hidden for s in shapes))
    return adapter


def check_structure_exportable(model: nn.Module, removes: bool = False, per_layer: bool = False,
                               narrows_attention: bool = False) -> None:
    """Refuse what llama.cpp cannot express for this model's family: removed sublayers or per-layer widths
    outside the Llama family (deci), narrowed attention where its loader shapes q and o as hidden x hidden. Called
    with a finished model's shapes, or before any work with what the chosen structure will do."""
    config = model.config
    family = gguf_family(config)
    if narrows_attention and family.full_query_width:
        raise ExportError(f"llama.cpp's {family.architecture} architecture needs query heads x head size = hidden size "
                          f"({config.hidden_size}), so narrowed attention cannot be exported for the "
                          f"{config.model_type} family; narrowed MLPs can.")
    if (removes or per_layer) and not family.per_layer:
        what = "removed sublayers" if removes else "per-layer widths"
        raise ExportError(f"llama.cpp's {family.architecture} architecture takes one width for every layer and no "
                          f"removed sublayers; {what} export for the Llama family only (as deci), so this "
                          f"{config.model_type} model cannot be exported with them.")


def export_gguf(loaded: LoadedModel, out: str | Path, outtype: str = "f16", embedding_type: str | None = None,
                overwrite: bool = False) -> ExportReport:
    """Write ``loaded`` to ``out`` (a .gguf file, replaced atomically); nothing is written when it cannot be."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"Output file {out} already exists; pass --overwrite to replace it.")
    model = loaded.model
    adapter = check_exportable(model)
    family = gguf_family(model.config)
    float_type = gguf_type(outtype)
    quantized = any(isinstance(m, GGUFLinear) for m in model.modules())
    embed_type = gguf_type(embedding_type or ("q8_0" if quantized or float_type.quantized else outtype))
    shapes = block_shapes(adapter)
    architecture = family.architecture if _uniform(shapes) else "deci"
    source = source_gguf(loaded)
    with atomic_path(out) as tmp:
        writer = GGUFWriter(tmp, architecture)
        _write_metadata(writer, model, adapter, shapes, architecture, _model_name(loaded), family)
        tokenizer_from = _write_tokenizer(writer, loaded, source)
        if architecture == "deci":
            types, linear_types = _write_tensors(writer, model, adapter, shapes, float_type, embed_type)
        else:
            types, linear_types = _write_named_tensors(writer, model, adapter, family, float_type, embed_type)
        writer.add_file_type(_file_type(linear_types))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    reader = GGUFReader(out)
    notes = [*_notes(model, shapes), *family.notes]
    return ExportReport(path=str(out), architecture=architecture, file_bytes=out.stat().st_size,
                        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors), tensor_types=dict(types),
                        linear_types=linear_types,
                        layer_dims={"head_count": [s.heads for s in shapes], "head_count_kv": [s.kv_heads for s in shapes],
                                    "feed_forward_length": [s.ffn for s in shapes]},
                        tokenizer_from=tokenizer_from, notes=notes)


# llama.cpp gives these tokens Phi-3's attributes whenever general.name contains "phi3" or "phi-3", and aborts when
# the vocabulary lacks one (llama-vocab.cpp)
PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _model_name(loaded: LoadedModel) -> str:
    """general.name: the model's spec, unless that would make llama.cpp look for Phi-3 tokens this vocabulary lacks."""
    name = f"{loaded.spec} (layerwise export)"
    vocabulary = loaded.tokenizer.get_vocab() if loaded.tokenizer is not None else {}
    if any(token not in vocabulary for token in PHI3_NAMED_TOKENS):
        name = re.sub(r"(phi-?)3", r"\1 3", name, flags=re.IGNORECASE)
    return name


def block_shapes(adapter: ModelAdapter) -> list[BlockShape]:
    """Per block: heads, KV heads and FFN width as llama.cpp needs them, stubs where removals need them."""
    shapes = []
    for index in range(adapter.num_blocks):
        attention, mlp = adapter.attention(index), adapter.mlp(index)
        geometry = None if attention.removed else adapter.head_geometry(index)
        shapes.append(BlockShape.of(index, geometry.num_heads if geometry else 0, geometry.num_kv_heads if geometry else 0,
                                    0 if mlp.removed else adapter.ffn_width(index)))
    return shapes


def _uniform(shapes: list[BlockShape]) -> bool:
    first = shapes[0]
    return all((s.heads, s.kv_heads, s.ffn) == (first.heads, first.kv_heads, first.ffn) and not s.attention_stub
               and not s.mlp_stub and s.heads > 0 and s.ffn > 0 for s in shapes)


def source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF file this model was loaded from, directly or through a layerwise run directory."""

    for spec in (loaded.spec, loaded.meta.get("source")):
        if not spec:
            continue
        if spec in NAMED_GGUF:
            return NAMED_GGUF[spec]()
        path = Path(str(spec)).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            return path.resolve()
    return None


def _rope_parameters(config) -> dict:
    """RoPE parameters of the full-attention layers (a config may hold one set per layer type)."""
    parameters = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return dict(parameters.get("full_attention", parameters))


def _rope_scaling(config) -> dict | None:
    scaling = _rope_parameters(config)
    if not scaling:
        return None
    if scaling.get("rope_type", scaling.get("type")) == "default":
        return None
    return dict(scaling)


def _rope_theta(config) -> float:
    return float(_rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_metadata(writer: GGUFWriter, model: nn.Module, adapter: ModelAdapter, shapes: list[BlockShape],
                    architecture: str, name: str, family: GGUFFamily) -> None:
    config = model.config
    head_dim = adapter.head_dim(None)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(shapes))
    if architecture == "deci":
        writer.add_feed_forward_length([s.ffn for s in shapes])
        writer.add_head_count([s.heads for s in shapes])
        writer.add_head_count_kv([s.kv_heads for s in shapes])
    else:
        writer.add_feed_forward_length(shapes[0].ffn)
        writer.add_head_count(shapes[0].heads)
        writer.add_head_count_kv(shapes[0].kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(rope_dimensions(config, head_dim))
    writer.add_rope_freq_base(_rope_theta(config))
    if family.layer_norm:
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().num_embeddings))
    rope = _rope_scaling(config)
    if rope and rope.get("rope_type", rope.get("type")) == "linear":

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    family.extra_keys(writer, config)


def _write_tokenizer(writer: GGUFWriter, loaded: LoadedModel, source: Path | None) -> str:
    """Copy every ``tokenizer.*`` key of the source GGUF, or build them from the Hugging Face tokenizer."""
    vocab_size = loaded.model.get_input_embeddings().num_embeddings
    if source is not None:
        reader = GGUFReader(source)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) == vocab_size:
            for key, field in reader.fields.items():
                if key.startswith("tokenizer."):
                    sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
                    writer.add_key_value(key, field.contents(), field.types[0], sub_type)
            return f"copied from {source.name}"
    return _write_hf_tokenizer(writer, loaded, vocab_size)


def _write_hf_tokenizer(writer: GGUFWriter, loaded: LoadedModel, vocab_size: int) -> str:

    with tempfile.TemporaryDirectory() as directory:
        loaded.tokenizer.save_pretrained(directory)
        for vocab_class, name in ((BpeVocab, "gpt2"), (LlamaHfVocab, "llama")):
            try:
                vocab, model_name = vocab_class(Path(directory)), name
                break
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue
        else:
            raise ExportError("GGUF export cannot describe this tokenizer: it is neither a GPT-2 style byte-level "
                              "BPE nor a Llama SentencePiece tokenizer.")
        tokens, scores, types = zip(*vocab.all_tokens())
        if len(tokens) > vocab_size:
            raise ExportError(f"The tokenizer has {len(tokens)} tokens but the embedding only {vocab_size} rows.")
        padding = vocab_size - len(tokens)
        writer.add_tokenizer_model(model_name)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens) + [f"[PAD{i}]".encode() for i in range(padding)])
        writer.add_token_types([int(t) for t in types] + [4] * padding)  # 4 = USER_DEFINED
        if model_name == "llama":
            writer.add_token_scores(list(scores) + [0.0] * padding)
        special = SpecialVocab(Path(directory), load_merges=model_name == "gpt2", n_vocab=vocab_size)
        if model_name == "gpt2" and not special.merges:  # a byte-level vocabulary without merges
            # llama.cpp requires the key and gguf refuses an empty array: one merge of two control tokens,
            # which BPE never sees (control tokens are matched before merging), keeps the vocabulary byte-level.
            # Hugging Face rejects that merge, so the exact tokenizer travels beside it for reading back.
            control = next(t.decode() for t, kind in zip(tokens, types) if int(kind) == 3)
            writer.add_token_merges([f"{control} {control}"])
            writer.add_string(HF_TOKENIZER_KEY, (Path(directory) / "tokenizer.json").read_text(encoding="utf-8"))
            special.load_merges = False
        special.add_to_gguf(writer, quiet=True)
    return f"written from the Hugging Face tokenizer ({model_name}, pre-tokenizer 'default')"


def _write_named_tensors(writer: GGUFWriter, model: nn.Module, adapter: ModelAdapter, family: GGUFFamily,
                         float_type: GGUFType, embed_type: GGUFType) -> tuple[Counter, dict[str, str]]:
    """Every parameter of a uniform model under the name llama.cpp's loader looks for (gguf-py's map of Hugging
    Face names), transformed as llama.cpp's converter transforms it; a parameter it has no name for is an error,
    never silently dropped."""
    names = tensor_name_map(family, adapter.num_blocks)
    head_dim = adapter.head_dim(None)
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.weight.data_ptr()
    counts: Counter = Counter()
    linear_types: dict[str, str] = {}
    for module_name, module in model.named_modules():
        tensors: dict[str, object] = dict(module.named_parameters(recurse=False))
        if isinstance(module, GGUFLinear):
            tensors = {"weight": module, **({"bias": module.bias} if module.bias is not None else {})}
        if not tensors or (module is output and tied):
            continue
        base = names.get_name(module_name)
        if base is None:
            raise ExportError(f"llama.cpp's {family.architecture} architecture has no tensor for {module_name}; "
                              "this model cannot be exported as it is.")
        for suffix, value in tensors.items():
            name = f"{base}.{suffix}"
            if isinstance(value, GGUFLinear) or value.dim() == 2:
                rows = value.out_features if isinstance(value, GGUFLinear) else value.shape[0]
                order = family.row_order(base.rsplit(".", 1)[-1], rows, model.config, head_dim)
                kind = embed_type if module is embedding or module is output else float_type
                stored = _write_matrix(writer, name, value, kind, order, counts)
                key = {id(embedding): "token_embd", id(output): "output"}.get(id(module), module_name)
                linear_types[key] = stored
            else:
                vector = value.detach().to(torch.float32).cpu()
                if suffix == "weight" and "norm" in base:
                    vector = vector + family.norm_shift
                order = family.row_order(base.rsplit(".", 1)[-1], vector.shape[0], model.config, head_dim)
                writer.add_tensor(name, vector.numpy()[order] if order is not None else vector.numpy())
                counts["f32"] += 1
    if tied and family.needs_output:
        linear_types["output"] = _write_matrix(writer, "output.weight", embedding.weight, embed_type, None, counts)
    _write_rope_factors(writer, model, adapter)
    return counts, linear_types


def _write_rope_factors(writer: GGUFWriter, model: nn.Module, adapter: ModelAdapter) -> None:
    """llama.cpp's ``rope_freqs`` tensor where the model uses Llama 3 RoPE scaling."""
    rope = _rope_scaling(model.config)
    if rope and rope.get("rope_type", rope.get("type")) == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(model.config, adapter.head_dim(None)))


def _write_matrix(writer: GGUFWriter, name: str, value, kind: GGUFType, order: np.ndarray | None,
                  counts: Counter) -> str:
    """A matrix (a GGUF linear's own bytes, or a float weight stored as ``kind``, llama.cpp's fallback applied)
    with its rows in ``order``; the type written."""
    if isinstance(value, GGUFLinear):
        raw, kind, columns = value.qdata.cpu().numpy(), value.kind, value.in_features
    else:
        kind = stored_type(kind.name, value.shape[1])
        raw, columns = quantize_matrix(value.detach(), kind), value.shape[1]
    raw = raw[order] if order is not None else raw
    if kind.quantized or kind.name == "bf16":  # uint8 rows of blocks: gguf derives the shape from the bytes
        writer.add_tensor(name, np.ascontiguousarray(raw), raw_dtype=kind.ggml)
    else:
        writer.add_tensor(name, raw.view(np.float16 if kind.name == "f16" else np.float32).reshape(raw.shape[0], columns))
    counts[kind.name] += 1
    return kind.name


def _write_tensors(writer: GGUFWriter, model: nn.Module, adapter: ModelAdapter, shapes: list[BlockShape],
                   float_type: GGUFType, embed_type: GGUFType) -> tuple[Counter, dict[str, str]]:
    counts: Counter = Counter()
    linear_types: dict[str, str] = {}

    def add_norm(name: str, weight: torch.Tensor) -> None:
        writer.add_tensor(name, weight.detach().to(torch.float32).cpu().numpy())
        counts["f32"] += 1

    def add_matrix(name: str, weight: torch.Tensor, kind: GGUFType, order: np.ndarray | None = None) -> str:
        return _write_matrix(writer, name, weight, kind, order, counts)

    def add_linear(name: str, linear: nn.Module, order: np.ndarray | None) -> str:
        return _write_matrix(writer, name, linear if isinstance(linear, GGUFLinear) else linear.weight, float_type,
                             order, counts)

    embedding = model.get_input_embeddings().weight
    linear_types["token_embd"] = add_matrix("token_embd.weight", embedding, embed_type)
    add_norm("output_norm.weight", model.get_submodule(adapter.final_norm).weight)
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != embedding.data_ptr():
        linear_types["output"] = add_matrix("output.weight", output.weight, embed_type)
    _write_rope_factors(writer, model, adapter)
    hidden = int(model.config.hidden_size)
    head_dim = adapter.head_dim(None)
    for index, shape in enumerate(shapes):
        block = adapter.blocks[index]
        prefix = f"blk.{index}"
        attention, mlp = adapter.attention(index), adapter.mlp(index)
        if shape.attention_stub:
            add_norm(f"{prefix}.attn_norm.weight", torch.ones(hidden))
            for role, (rows, columns) in attention_stub_shapes(hidden, head_dim).items():
                add_matrix(f"{prefix}.{LINEAR_NAMES['attention', role]}.weight", torch.zeros(rows, columns),
                           gguf_type("f32"))
        elif not attention.removed:
            add_norm(f"{prefix}.attn_norm.weight", block.get_submodule(adapter.attention_norm).weight)
            for role, linear in attention.linears.items():
                heads = {"q": shape.heads, "k": shape.kv_heads}.get(role)
                order = rotary_rows(linear.out_features, heads) if heads else None
                unit = f"{attention.name}.{adapter.attention_roles[role]}"
                linear_types[unit] = add_linear(f"{prefix}.{LINEAR_NAMES['attention', role]}.weight", linear, order)
        if shape.mlp_stub:
            add_norm(f"{prefix}.ffn_norm.weight", torch.ones(hidden))
            for role, (rows, columns) in mlp_stub_shapes(hidden).items():
                add_matrix(f"{prefix}.{LINEAR_NAMES['mlp', role]}.weight", torch.zeros(rows, columns), gguf_type("f32"))
        elif not mlp.removed:
            add_norm(f"{prefix}.ffn_norm.weight", block.get_submodule(adapter.mlp_norm).weight)
            for role, linear in mlp.linears.items():
                unit = f"{mlp.name}.{adapter.mlp_roles[role]}"
                linear_types[unit] = add_linear(f"{prefix}.{LINEAR_NAMES['mlp', role]}.weight", linear, None)
    return counts, linear_types


def _llama3_rope_factors(config, head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3 RoPE scaling (as its converter computes it)."""
    rope = _rope_scaling(config)
    base = _rope_theta(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _file_type(linear_types: dict[str, str]) -> int:
    """general.file_type: all f32, mostly f16, one quantized type throughout, or 'guessed' for a mix."""
    kinds = {kind for unit, kind in linear_types.items() if unit not in ("token_embd", "output")}
    if kinds == {"f32"}:
        return int(LlamaFileType.ALL_F32)
    if kinds == {"f16"}:
        return int(LlamaFileType.MOSTLY_F16)
    single = {"q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
              "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K"}
    if len(kinds) == 1 and next(iter(kinds)) in single:
        return int(LlamaFileType[single[next(iter(kinds))]])
    return int(LlamaFileType.GUESSED)


# zeros above this share of the float linear weights come from masked pruning, not rounding (a Q4_1- or
# Q8_0-born model's dequantized weights hold about 1% zeros)
MASKED_SPARSITY_NOTE = 0.05


def _notes(model: nn.Module, shapes: list[BlockShape]) -> list[str]:
    notes = []
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if total and zeros / total > MASKED_SPARSITY_NOTE:
        notes.append(f"{zeros / total:.1%} of the float linear weights are zero and stored dense: llama.cpp has no "
                     "sparse kernels, so masked sparsity saves no bytes or time there.")
    stubs = [i for i, s in enumerate(shapes) if s.mlp_stub]
    if stubs:
        notes.append(f"layers {stubs} keep attention without an MLP: written with a one-channel zero FFN, because "
                     "llama.cpp's deci graph drops the attention residual of a layer with FFN length 0.")
    if shapes[0].attention_stub:
        notes.append("layer 0's attention was removed: written as one zero-weight head, because llama.cpp takes "
                     "the head size of every layer from layer 0.")
    return notes



def non_linear_bytes(model: nn.Module, embedding_type: str = "q8_0") -> int:
    """Tensor bytes a GGUF export of ``model`` spends outside the decoder linears: the token embedding (and an
    untied output matrix) at ``embedding_type``, every norm in f32. A ``--max-bytes`` budget leaves the rest to
    the linears."""
    columns = model.get_input_embeddings().weight.shape[1]
    norms = 1 + sum(shape.norms for shape in block_shapes(get_adapter(model)))
    return embedding_bytes(model, embedding_type) + 4 * columns * norms


def embedding_bytes(model: nn.Module, embedding_type: str = "q8_0") -> int:
    """Tensor bytes of the token embedding (and an untied output matrix) stored as ``embedding_type``."""
    embedding = model.get_input_embeddings().weight
    rows, columns = embedding.shape
    kind = stored_type(embedding_type, columns)
    total = kind.nbytes(rows, columns)
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != embedding.data_ptr():
        total += kind.nbytes(*output.weight.shape)
    return total


def gguf_tensor_names(model: nn.Module) -> dict[str, str]:
    """Decoder-linear unit name -> its tensor's name in a GGUF export (``model.layers.3.mlp.down_proj`` ->
    ``blk.3.ffn_down.weight``), for every linear still present."""

    names = tensor_name_map(gguf_family(model.config), get_adapter(model).num_blocks)
    return {unit: f"{names.get_name(unit)}.weight" for unit in decoder_linears(model)}


def profile_imatrix(model: nn.Module, profile) -> dict[str, np.ndarray]:
    """An importance matrix for llama.cpp's quantizer from a calibration Profile: per GGUF tensor, the mean
    squared input of every column (what ``llama-imatrix`` accumulates)."""
    matrix = {}
    for unit, name in gguf_tensor_names(model).items():
        stats = profile.units.get(unit)
        if stats is not None:
            matrix[name] = (stats.sum_sq / max(1, stats.tokens)).to(torch.float32).numpy()
    return matrix
