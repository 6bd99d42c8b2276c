"""A tiny, fully offline word-level tokenizer.

The tiny test pipelines (and small reference models with a closed caption
vocabulary) need tokenizers that behave like the real ones at the interface
level -- ``padding="max_length"``, truncation, attention masks, special tokens
-- without downloading anything.  :func:`build_word_tokenizer` builds one from
a word list with the ``tokenizers`` library and wraps it in a
:class:`transformers.PreTrainedTokenizerFast`.

Ids are deterministic: the special tokens come first, in the fixed order
pad, eos, unk, bos, then any extra special tokens; the (lower-cased,
de-duplicated) words follow in the order given.
"""

from __future__ import annotations

from typing import Any, Sequence

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["build_word_tokenizer"]

_DEFAULT_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": None}


def build_word_tokenizer(
    words: Sequence[str], model_max_length: int = 32, **special: Any
) -> PreTrainedTokenizerFast:
    """Build a word-level fast tokenizer over ``words``.

    Text is lower-cased and split on whitespace and punctuation (the
    ``Whitespace`` pre-tokenizer, i.e. ``\\w+|[^\\w\\s]+``); any piece not in
    the vocabulary maps to the unk token.  Include punctuation in ``words`` if
    it should get its own id.

    Keyword arguments (all optional):

    - ``pad_token`` (``"<pad>"``), ``eos_token`` (``"</s>"``), ``unk_token``
      (``"<unk>"``), ``bos_token`` (``None``): special token strings; pass
      ``None`` for bos/eos to leave them out.  pad and unk are required.
    - ``additional_special_tokens`` / ``extra_special_tokens``: further
      special tokens (e.g. chat-template markers); they are matched verbatim
      in the text before pre-tokenization and never split.
    - ``add_bos_token`` (default: ``bos_token is not None``) and
      ``add_eos_token`` (default: ``eos_token is not None``): whether encoding
      prepends bos / appends eos.  Truncation keeps room for them.
    - ``padding_side`` / ``truncation_side`` (default ``"right"``).

    Returns a :class:`transformers.PreTrainedTokenizerFast` whose
    ``model_max_length`` is ``model_max_length``.
    """
    specials = dict(_DEFAULT_SPECIALS)
    for key in _DEFAULT_SPECIALS:
        if key in special:
            specials[key] = special.pop(key)
    if specials["pad_token"] is None or specials["unk_token"] is None:
        raise ValueError("build_word_tokenizer needs a pad_token and an unk_token")
    extra = list(special.pop("additional_special_tokens", ()) or ())
    extra += [t for t in special.pop("extra_special_tokens", ()) or () if t not in extra]
    add_bos = bool(special.pop("add_bos_token", specials["bos_token"] is not None))
    add_eos = bool(special.pop("add_eos_token", specials["eos_token"] is not None))
    padding_side = special.pop("padding_side", "right")
    truncation_side = special.pop("truncation_side", "right")
    if special:
        raise TypeError(f"build_word_tokenizer: unexpected keyword arguments {sorted(special)}")

    special_tokens = [t for t in (specials[k] for k in ("pad_token", "eos_token", "unk_token", "bos_token")) if t]
    special_tokens += [t for t in extra if t not in special_tokens]
    vocab: dict[str, int] = {}
    for token in special_tokens:
        vocab.setdefault(token, len(vocab))
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        padding_side=padding_side,
        truncation_side=truncation_side,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        extra_special_tokens=[t for t in extra if t not in specials.values()],
        **{k: v for k, v in specials.items() if v is not None},
    )
    return tokenizer
