"""A Hugging Face tokenizer from the ``tokenizer.*`` keys of any GGUF file, so the protocol's token ids for a
GGUF model are the ones its source model used. transformers reads GGUF tokenizers only for architectures it
knows (not ``deci``), so the keys are copied into a metadata-only ``llama`` GGUF and read from there."""

from __future__ import annotations

import tempfile
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..errors import ModelNotFoundError

# metadata key holding the Hugging Face tokenizer.json where GGUF's own keys cannot describe it exactly (layerwise's
# exports write it; this module reads it)
HF_TOKENIZER_KEY = "layerwise.tokenizer.huggingface_json"


def carries_hf_tokenizer(path: str | Path) -> bool:
    """Whether the GGUF file holds a Hugging Face tokenizer definition beside its ``tokenizer.ggml.*`` keys (as
    layerwise's exports do)."""
    return HF_TOKENIZER_KEY in GGUFReader(Path(path)).fields


def tokenizer_from_gguf(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file at ``path`` (its tensors are never read)."""
    source = Path(path)
    reader = GGUFReader(source)
    if HF_TOKENIZER_KEY in reader.fields:  # written by layerwise beside a tokenizer GGUF cannot express

        return _fast_tokenizer(Tokenizer.from_str(reader.fields[HF_TOKENIZER_KEY].contents()), reader)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelNotFoundError(f"{source} holds no tokenizer (no tokenizer.ggml.tokens).")
    with tempfile.TemporaryDirectory() as directory:
        stub = Path(directory) / "tokenizer.gguf"
        writer = GGUFWriter(stub, "llama")
        writer.add_block_count(1)
        writer.add_context_length(1)
        writer.add_embedding_length(1)
        writer.add_feed_forward_length(1)
        writer.add_head_count(1)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), field.types[0], sub_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        try:
            return AutoTokenizer.from_pretrained(directory, gguf_file=stub.name)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(f"Cannot read the tokenizer of {source}: {str(exc).splitlines()[0]}") from None


def _fast_tokenizer(tokenizer, reader: GGUFReader) -> PreTrainedTokenizerBase:
    """A transformers tokenizer around ``tokenizer`` with the file's special tokens."""

    tokens = reader.fields["tokenizer.ggml.tokens"]
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        field = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            special[f"{role}_token"] = str(tokens.contents(int(field.contents())))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1 << 30, **special)
