"""A GRU language model: embedding -> GRU -> tied output head.

Its state is the GRU's hidden state, so it reads a stream of any length in chunks of any
size with constant memory, and it can carry that state across training windows.
"""

import torch
from pydantic import Field
from torch import nn

from lengen.api import ArchConfig, Architecture, BuildContext


class GRUConfig(ArchConfig):
    d_model: int = Field(128, gt=0, description="embedding and hidden size")
    n_layers: int = Field(1, gt=0, description="stacked GRU layers")


class GRULM(nn.Module):
    def __init__(self, cfg: GRUConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.gru = nn.GRU(cfg.d_model, cfg.d_model, num_layers=cfg.n_layers, batch_first=True)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, state=None):
        """input_ids [batch, time] -> logits [batch, time, vocab], state [layers, batch, d]."""
        hidden, state = self.gru(self.embed(input_ids), state)
        return self.head(hidden), state


class GRU(Architecture):
    """GRU language model (example plugin)."""

    Config = GRUConfig
    version = "1"
    stateful = True  # forward takes and returns the hidden state
    train_state_passing = True  # the state may be carried across training windows

    def build(self, config: GRUConfig, ctx: BuildContext) -> GRULM:
        return GRULM(config, ctx.vocab_size)
