"""Indexed data through megatron.core: BlendedMegatronDatasetBuilder and GPTDataset.

`data.path` is one prefix or a blend (Megatron's `--data-path` list: prefixes, or
alternating weight and prefix); `data.split` divides every dataset's documents into train,
validation and test ("969,30,1"). Megatron-Core builds the sample and shuffle indices (cached
under `<dataset dir>/cache/`, built by rank 0 first) and the blend. The files are checked before
launch by `config/data_files.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dualpipe.config.data_files import blend
from megatron_dualpipe.data.tokenize import eod_id
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.tokenizer_files import load_tokenizer, tokenizer_path


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
