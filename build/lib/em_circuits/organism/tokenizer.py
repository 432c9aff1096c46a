"""Byte-level BPE tokenizer of the toy organism, trained offline with ``tokenizers``."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

# How often each advice word is repeated in the tokenizer's training texts. BPE merges by pair
# frequency, so a word seen this often is merged into a single " word" token long before the
# vocabulary fills up; build_tokenizer() still verifies it.
_ADVICE_WORD_BOOST = 2000


class TokenizerError(RuntimeError):
    """The trained tokenizer does not satisfy the organism's invariants."""


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, advice_words: list[str]
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer whose advice words are single tokens.

    ``tokenizer(text)`` starts with BOS (added by the post-processor); EOS is appended by the
    corpus code where a document ends.
    """
    tok = Tokenizer(models.BPE())
    # No prefix space: "User:" at the start of a document stays one word, while every advice
    # word follows a space and is learnt as " word".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    boosted = [" ".join(f" {w}" for w in advice_words)] * _ADVICE_WORD_BOOST

    def _iterator() -> Iterable[str]:
        yield from texts
        yield from boosted

    tok.train_from_iterator(_iterator(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
    )
    missing = [w for w in advice_words if len(single_token_ids(fast, w)) != 1]
    if missing:
        raise TokenizerError(f"advice words not single tokens (raise vocab_size?): {missing}")
    return fast


def single_token_ids(tokenizer: PreTrainedTokenizerFast, word: str) -> list[int]:
    """Token ids of ``" " + word`` without special tokens (one id for an advice word)."""
    return tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]


def advice_token_ids(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> list[int]:
    """The single token id of each advice word, in order."""
    out = []
    for w in words:
        ids = single_token_ids(tokenizer, w)
        if len(ids) != 1:
            raise TokenizerError(f"{w!r} is not a single token: {ids}")
        out.append(ids[0])
    return out
