"""The indexed data files a recipe names (`data.path`): checked before any worker starts.

`data.path` is one prefix or a blend (Megatron's `--data-path` list: prefixes, or alternating
weight and prefix); every prefix needs its .bin/.idx, and the tokenizer `data prepare` saved
beside it (if any) must fit `model.vocab_size`. data/gpt_dataset.py builds the datasets.
"""

from __future__ import annotations

from pathlib import Path

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.tokenizer_files import load_tokenizer, tokenizer_path, vocab_size


def blend(path: str | list) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights or None) of `data.path`."""
    from megatron.core.datasets.utils import get_blend_from_list

    items = [path] if isinstance(path, str) else [str(p) for p in path]
    return get_blend_from_list(items)


def check_indexed_data(recipe) -> None:
    """Before launch: every prefix has its .bin/.idx, and the tokenizer saved beside it (if
    any) fits `model.vocab_size`. Raises `UserError`."""
    d = recipe.data
    if d.kind != "indexed":
        return
    if not d.path:
        raise UserError("data.kind=indexed needs data.path (a prefix of a .bin/.idx pair made by "
                        "`python -m megatron_dualpipe data prepare`, or a blend list)")
    prefixes, _ = blend(d.path)
    for prefix in prefixes:
        missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
        if missing:
            raise UserError(f"data.path: {prefix}{'/'.join(missing)} not found (make it with "
                            "`python -m megatron_dualpipe data prepare --output-prefix "
                            f"{prefix} ...`)")
        saved = tokenizer_path(prefix)
        if saved.is_file():
            size = vocab_size(load_tokenizer(saved, what="data.path tokenizer"))
            if size > recipe.model.vocab_size:
                raise UserError(f"data.path {prefix}: its tokenizer ({saved}) has {size} ids but "
                                f"model.vocab_size={recipe.model.vocab_size}; set "
                                f"model.vocab_size >= {size}")
