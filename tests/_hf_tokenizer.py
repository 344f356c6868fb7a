"""A tiny Llama-style Hugging Face tokenizer, built locally (no download) for tests.

Byte-level BPE trained on the given texts, with ``<unk>``, ``<s>`` (BOS) and ``</s>`` (EOS)
as ids 0, 1, 2 and a post-processor that puts ``<s>`` in front of every encoding, as Llama
3's tokenizer.json does; wrapped in ``transformers.PreTrainedTokenizerFast`` and written
with ``save_pretrained`` (tokenizer.json + tokenizer_config.json).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tests.conftest import oracle

SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2


def build_tiny_hf_tokenizer(out_dir: str | Path, texts: Iterable[str],
                            vocab_size: int = 300) -> Path:
    """Train and save the tokenizer into ``out_dir``; returns ``out_dir``."""
    tk = oracle("tokenizers")
    transformers = oracle("transformers")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = tk.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = Path(out_dir)
    fast.save_pretrained(str(out))
    return out
