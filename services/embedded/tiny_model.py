"""Tiny causal language models that the project makes itself, with no download.

Tests, examples, benchmarks and Ray jobs need a real Hugging Face model
directory that both transformers and vLLM's CPU build load. This module owns
that: a Qwen2-architecture model built from a config (head dimension 64, which
vLLM's CPU attention requires) and the project's own byte-level tokenizer
(every byte is a token, digits are single tokens, plus chat special tokens and
a chat template). Directories are cached under ``$GRPO_CACHE_DIR``
(default ``~/.cache/grpo-service``) and written atomically.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HEAD_DIM = 64
EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
PAD_TOKEN = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    """Shape of one tiny-model size; the head dimension is always 64."""

    hidden_size: int
    layers: int
    intermediate_size: int
    kv_heads: int

    @property
    def heads(self) -> int:
        return self.hidden_size // HEAD_DIM


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden_size=64, layers=4, intermediate_size=256, kv_heads=1),
    "small": ModelSize(hidden_size=128, layers=8, intermediate_size=512, kv_heads=2),
    "20m": ModelSize(hidden_size=384, layers=8, intermediate_size=1536, kv_heads=6),
    "100m": ModelSize(hidden_size=768, layers=10, intermediate_size=3072, kv_heads=12),
}


def cache_root() -> Path:
    """Where built models and data are cached (``$GRPO_CACHE_DIR``)."""
    default = Path.home() / ".cache" / "grpo-service"
    return Path(os.environ.get("GRPO_CACHE_DIR", default)).expanduser().resolve()


def build_tokenizer():
    """The project's byte-level tokenizer as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN, *CHAT_TOKENS, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised Qwen2 model and its tokenizer to ``out_dir``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = _size(size)
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=_padded_vocab(len(tokenizer)),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_model_dir(size: str = "tiny", seed: int = 0) -> Path:
    """A cached model directory of the given size, built on first use."""
    _size(size)
    return cached_directory(f"models/{size}-seed{seed}", lambda d: build_tiny_model(d, size, seed))


def cached_directory(name: str, build) -> Path:
    """Return ``cache_root()/name``, calling ``build(tmp_dir)`` once if absent.

    The directory appears atomically (built in a temporary sibling, then
    renamed) and concurrent callers wait on a file lock instead of racing.
    """
    target = cache_root() / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                build(tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def parameter_count(model_dir: str | Path) -> int:
    """Number of parameters of a saved model (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _size(name: str) -> ModelSize:
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


def _padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    return -(-n_tokens // multiple) * multiple
