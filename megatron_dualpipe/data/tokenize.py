"""Tokenizers for `data prepare`: a local Hugging Face `tokenizer.json`, or a byte-level BPE
trained on the corpus itself (no model hub needed).

Whatever was used is saved beside the dataset as `<prefix>.tokenizer.json`
(`tokenizer_files.py`), so training can check its vocabulary against `model.vocab_size`.
"""

from __future__ import annotations

from collections.abc import Iterable

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.tokenizer_files import tokenizers_library

# End-of-document token names, in the order they are looked for in a given tokenizer.
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
TRAINED_EOD = "<|endoftext|>"
MIN_TRAINED_VOCAB = 257  # the 256 byte tokens + end-of-document


def eod_id(tokenizer, name: str | None = None, what: str = "--tokenizer") -> int:
    """Id of the end-of-document token: `name`, or the first of `EOD_NAMES` the tokenizer has."""
    names = (name,) if name else EOD_NAMES
    for candidate in names:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    if name:
        raise UserError(f"--eod-token {name!r}: not in the tokenizer's vocabulary")
    raise UserError(f"{what}: no end-of-document token found (looked for "
                    f"{', '.join(EOD_NAMES)}); name it with --eod-token")


def check_trainable(size: int) -> None:
    """A byte-level BPE needs its 256 byte tokens and the end-of-document token."""
    if size < MIN_TRAINED_VOCAB:
        raise UserError(f"--vocab-size {size}: a byte-level BPE needs at least "
                        f"{MIN_TRAINED_VOCAB} ids (256 bytes + end-of-document)")


def train_bpe(texts: Iterable[str], size: int):
    """A byte-level BPE with `size` ids (id 0: end-of-document) trained on `texts`."""
    check_trainable(size)
    tokenizers = tokenizers_library()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=[TRAINED_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
