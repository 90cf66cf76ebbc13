"""Indexed data through megatron.core: BlendedMegatronDatasetBuilder and GPTDataset.

`data.path` is one prefix or a blend (Megatron's `--data-path` list: prefixes, or
alternating weight and prefix); `data.split` divides every dataset's documents into train,
validation and test ("969,30,1"). Megatron-Core builds the sample and shuffle indices (cached
under `<dataset dir>/cache/`, built by rank 0 first) and the blend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_dualpipe.data.tokenize import eod_id, load_tokenizer, tokenizer_path, vocab_size
from megatron_dualpipe.errors import UserError


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


@dataclass
class _TokenizerIds:
    """What GPTDataset reads from a tokenizer: the end-of-document id (only used for Megatron's
    optional document masks, which are off here)."""

    eod: int
    vocab_size: None = None  # keeps GPTDatasetConfig from guessing the token dtype

    @property
    def unique_identifiers(self) -> dict:
        """Part of the key of Megatron's index cache."""
        return {"class": "megatron_dualpipe.data.gpt_dataset", "eod": self.eod}


def _eod(prefixes: list[str]) -> int:
    saved = tokenizer_path(prefixes[0])
    if saved.is_file():
        return eod_id(load_tokenizer(saved, what="data.path tokenizer"),
                      what=f"data.path tokenizer {saved}")
    return 0


def build_gpt_datasets(recipe, num_train: int, num_valid: int):
    """(train, valid) datasets with at least the given numbers of samples (valid None when
    `num_valid` is 0). Call on every rank (rank 0 builds the index caches first)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d = recipe.data
    prefixes, weights = blend(d.path)
    config = GPTDatasetConfig(
        random_seed=d.seed,
        sequence_length=recipe.model.seq_length,
        blend=(prefixes, weights),
        split=d.split,
        tokenizer=_TokenizerIds(eod=_eod(prefixes)),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [num_train, num_valid, 0]  # Megatron needs sizes with weighted blends
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, sizes, lambda: True, config).build()
    except (AssertionError, ValueError) as exc:
        raise UserError(f"data.path/data.split: megatron.core cannot build the datasets: "
                        f"{exc}") from None
    for name, dataset, wanted in (("train", train, num_train), ("validation", valid, num_valid)):
        if wanted and (dataset is None or len(dataset) == 0):
            raise UserError(f"data.split={d.split!r}: the {name} split of data.path is empty; "
                            "give it a larger share or use more data")
    return train, (valid if num_valid else None)


class GPTSamples:
    """Sample `i` of a Megatron dataset as seq_length+1 token ids (indices wrap around)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def sample(self, index: int) -> torch.Tensor:
        item = self.dataset[index % len(self.dataset)]
        return torch.cat([item["tokens"], item["labels"][-1:]])
