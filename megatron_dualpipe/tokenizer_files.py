"""A dataset's saved tokenizer: `<prefix>.tokenizer.json` beside its .bin/.idx, read with the
`tokenizers` library. Used by `data prepare` (data/), the data rule of a recipe (config/) and the
dataset (data/gpt_dataset.py), so it sits below all of them.
"""

from __future__ import annotations

from pathlib import Path

from megatron_dualpipe.errors import UserError


def tokenizers_library():
    """The `tokenizers` module, or a UserError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise UserError("reading or training a tokenizer needs the tokenizers library: pip install "
                        "tokenizers (scripts/install.sh installs it)") from None
    return tokenizers


def tokenizer_path(prefix: str) -> Path:
    """Where the dataset with output prefix `prefix` keeps its tokenizer."""
    return Path(f"{prefix}.tokenizer.json")


def load_tokenizer(path: str | Path, what: str = "--tokenizer"):
    """A `tokenizers.Tokenizer` from a local tokenizer.json file."""
    tokenizers = tokenizers_library()
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {path}: no such file (a Hugging Face tokenizer.json)")
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises its own exception type
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what} {path}: not a Hugging Face tokenizer.json ({first})") from None


def vocab_size(tokenizer) -> int:
    """Number of token ids, added special tokens included."""
    return tokenizer.get_vocab_size(with_added_tokens=True)
