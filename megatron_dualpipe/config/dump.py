"""The fully resolved recipe (includes merged, overrides applied, defaults filled in) as YAML:
what `train --print-config` prints and what a run writes to `<train.log_dir>/config.yaml`.
The output is itself a recipe: `train <log_dir>/config.yaml` repeats the run."""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_dualpipe.config.schema import Recipe


def resolved_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False,
                          default_flow_style=None, width=100)


def write_resolved(recipe: Recipe, directory: str) -> Path:
    path = Path(directory) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(resolved_yaml(recipe))
    return path
