"""Character-level tokenizer of the built-in tiny MoE: one token per character of a fixed alphabet."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
# Every character the synthetic tasks use plus common punctuation, so user prompts in the same
# style stay in vocabulary. Changing it changes token ids: the shipped model depends on it.
ALPHABET: str = " " + string.digits + string.ascii_lowercase + "+-*/=<>()[],.:;?!'\"_#"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer (BOS prepended, no EOS appended; callers add EOS)."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character, spaces included, is its own pre-token, so WordLevel sees single chars.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )
