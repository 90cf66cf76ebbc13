"""Training data: synthetic tokens or Megatron indexed datasets, and `data prepare`."""

from megatron_dualpipe.data.source import MicrobatchSource, make_source, make_sources
from megatron_dualpipe.data.synthetic import SyntheticTokens

__all__ = ["MicrobatchSource", "SyntheticTokens", "make_source", "make_sources"]
