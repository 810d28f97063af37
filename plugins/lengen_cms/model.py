"""Nested CMS-LSTM: a continuum memory system of levels updated at different frequencies.

After seed 002 and Behrouz et al. 2025, *Nested Learning* (the "continuum memory system"):
the model's parameters are arranged in levels, level l updated only every ``periods[l]``
optimizer steps with the **sum** of its gradients over those steps and its learning rate
divided by its period. The seed's model, which the ``seed`` preset reproduces exactly
(1,197,339 parameters at vocab 283)::

    Embedding(V, 256) -> level 1: LSTM 256 -> 256          (every step,  lr)
                      -> level 2: FFN 256 -> 512 -> 256, GELU  (every 16,   lr / 16)
                      -> level 3: FFN 256 -> 512 -> 256, GELU  (every 256,  lr / 256)
                      -> Linear(256, V)

No residuals, no norms. The embedding and the head belong to level 1. The LSTM's (h, c) is
the state: returned, carried by the harness across training windows (``train.state_passing``)
and across evaluation chunks, never kept in the module.

"Surprise" (``surprise``): an auxiliary loss ``lambda_l * MSE(y_l, g_l)`` on the outputs
``y_1`` (the LSTM) and ``y_2`` (level 2), with the target ``g_l = dL/dy_l`` computed by one
``torch.autograd.grad`` and treated as a constant (no second-order graph). ``sum`` (default)
takes L = the summed token losses, so ``g`` is each token's own loss gradient, independent of
batch size and process count; ``mean`` takes the mean loss, as the seed did (the target is
then divided by the batch's B x T tokens, RMS ~5e-6 at 64 x 512, and the term acts as an
activation-norm penalty); ``off`` drops the term. The
target is clamped to +-``surprise_clamp`` (the seed's "gradient clip 10").

The schedule itself is the harness's (``lengen.api.ParamGroup``, ``update_every``): one
AdamW per period, so a slow level's Adam moments advance only on its own updates.
``seed_exact`` reproduces the seed's grouping for the record: embedding and head frozen (in
no optimizer), and its 0-indexed schedule (nothing updates at step 0; level l first updates
at step ``periods[l]`` 0-indexed with ``periods[l] + 1`` summed gradients).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lengen.api import ArchConfig, Architecture, BuildContext, Output, ParamGroup

PRESETS = {
    "seed": dict(d_model=256, hidden=256, d_ff=512),  # seed 002's shapes
    "cpu": dict(d_model=160, hidden=160, d_ff=320),  # the seed's proportions at the CPU suites' ~0.45M parameters
}


class CMSConfig(ArchConfig):
    preset: Literal["seed", "cpu"] = Field(
        "seed", description="sizes: seed (embedding 256, LSTM hidden 256, FFN 512) or cpu (160, 160, 320); "
                            "d_model, hidden, d_ff given explicitly override it")
    d_model: int | None = Field(None, gt=0, description="embedding size, the LSTM's input (default: the preset's)")
    hidden: int | None = Field(None, gt=0, description="LSTM hidden size, each FFN's input and output (default: the preset's)")
    d_ff: int | None = Field(None, gt=0, description="FFN inner size (default: the preset's)")
    periods: list[int] = Field([1, 16, 256], min_length=1,
                               description="update period of each level in optimizer steps: level 1 is the LSTM "
                                           "(with the embedding and head), each further level one FFN")
    lr_scaling: bool = Field(True, description="level l's learning rate is lr / periods[l] (the seed's); false: lr")
    surprise: Literal["sum", "mean", "off"] = Field(
        "sum", description="surprise target: gradient of the summed token losses (sum), of the mean loss (mean, "
                           "the seed's), or no surprise term (off)")
    surprise_weights: list[float] = Field([0.05, 0.01], description="lambda of the surprise term on the outputs "
                                                                   "of levels 1, 2, ... (the seed's 0.05, 0.01)")
    surprise_clamp: float = Field(10.0, ge=0, description="clamp the surprise target to +-this (the seed's 10); 0: off")
    seed_exact: bool = Field(False, description="the seed's optimizer grouping: embedding and head never trained, "
                                                "0-indexed schedule")

    @model_validator(mode="after")
    def _check(self) -> "CMSConfig":
        if any(p < 1 for p in self.periods):
            raise ValueError(f"periods must be >= 1 optimizer steps, got {self.periods}")
        if len(self.surprise_weights) > len(self.periods):
            raise ValueError(f"surprise_weights has {len(self.surprise_weights)} entries for "
                             f"{len(self.periods)} levels; give at most one per level")
        return self

    def sizes(self) -> dict:
        """The preset's sizes with explicit keys applied."""
        out = dict(PRESETS[self.preset])
        out.update({k: v for k in ("d_model", "hidden", "d_ff") if (v := getattr(self, k)) is not None})
        return out


class FFN(nn.Module):
    """A slow level: Linear -> GELU -> Linear (xavier-uniform weights, zero biases, as the seed)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.up = nn.Linear(dim, inner)
        self.down = nn.Linear(inner, dim)
        for lin in (self.up, self.down):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class CMSLSTM(nn.Module):
    def __init__(self, cfg: CMSConfig, vocab_size: int):
        super().__init__()
        s = cfg.sizes()
        self.config = cfg  # what training_losses reads (surprise settings)
        self.embed = nn.Embedding(vocab_size, s["d_model"])
        self.lstm = nn.LSTM(s["d_model"], s["hidden"], batch_first=True)  # level 1
        self.ffns = nn.ModuleList(FFN(s["hidden"], s["d_ff"]) for _ in cfg.periods[1:])  # levels 2, 3, ...
        self.head = nn.Linear(s["hidden"], vocab_size)
        if cfg.seed_exact:  # the seed's embedding and head were in no optimizer
            self.embed.requires_grad_(False)
            self.head.requires_grad_(False)

    def levels(self) -> list[list[nn.Parameter]]:
        """Each level's parameters; level 1 holds the embedding, the LSTM and the head."""
        first = [*self.embed.parameters(), *self.lstm.parameters(), *self.head.parameters()]
        return [first] + [list(f.parameters()) for f in self.ffns]

    def forward(self, input_ids: torch.Tensor, state=None):
        """``input_ids`` [B, T] -> logits [B, T, V], state (h, c) each [1, B, hidden]."""
        y, (h, c) = self.lstm(self.embed(input_ids), state)
        outputs = [y]  # y_1, y_2, ...: each level's output, for the surprise term
        for ffn in self.ffns:
            y = ffn(y)
            outputs.append(y)
        logs = {"state_norm.h": h.detach().norm(dim=-1).mean(), "state_norm.c": c.detach().norm(dim=-1).mean()}
        return Output(self.head(y), (h, c), logs=logs, internals={"levels": outputs})


class CMS(Architecture):
    """Nested CMS-LSTM (seed 002): LSTM + FFN levels updated every 1 / 16 / 256 steps, surprise term."""

    Config = CMSConfig
    version = "1"
    stateful = True  # (h, c): streaming in chunks equals one pass
    train_state_passing = True  # the seed's persistent state: carried across consecutive windows

    def build(self, config: CMSConfig, ctx: BuildContext) -> CMSLSTM:
        return CMSLSTM(config, ctx.vocab_size)

    def param_groups(self, model: CMSLSTM, config: CMSConfig) -> list[ParamGroup]:
        """Level l: one group for its matrices (weight decay) and one for its biases (none), both
        updated every ``periods[l]`` steps at ``lr / periods[l]``."""
        groups = []
        for l, (params, period) in enumerate(zip(model.levels(), config.periods), start=1):
            scale = 1.0 / period if config.lr_scaling else 1.0
            offset = 1 if config.seed_exact else 0
            params = [p for p in params if p.requires_grad]
            groups.append(ParamGroup([p for p in params if p.dim() >= 2], name=f"level{l}", lr_scale=scale,
                                     update_every=period, offset=offset))
            groups.append(ParamGroup([p for p in params if p.dim() < 2], name=f"level{l}.bias", lr_scale=scale,
                                     weight_decay=0.0, update_every=period, offset=offset))
        return groups

    def training_losses(self, model, output: Output, targets, token_nll) -> dict:
        """The surprise term of each weighted level: ``lambda_l * MSE(y_l, clamp(dL/dy_l))``."""
        config: CMSConfig = model.config
        if config.surprise == "off" or not any(config.surprise_weights):
            return {}
        ys = output.internals["levels"][:len(config.surprise_weights)]
        loss = token_nll.sum() if config.surprise == "sum" else token_nll.mean()
        targets_g = torch.autograd.grad(loss, ys, retain_graph=True)  # constants: no create_graph
        out = {}
        for l, (y, g, lam) in enumerate(zip(ys, targets_g, config.surprise_weights), start=1):
            if lam:
                if config.surprise_clamp:
                    g = g.clamp(-config.surprise_clamp, config.surprise_clamp)
                out[f"surprise.level{l}"] = lam * F.mse_loss(y.float(), g.float())
        return out

    def flops_per_token(self, model: CMSLSTM, config: CMSConfig, seq_len: int) -> dict:
        """Matrix-multiply FLOPs of one token's forward (2 per multiply-add), by part: the FLOP
        counter cannot see inside a cuDNN LSTM."""
        d, h = model.lstm.input_size, model.lstm.hidden_size
        return {"lstm": 2.0 * 4 * h * (d + h),
                "ffn": sum(2.0 * (f.up.in_features * f.up.out_features + f.down.in_features * f.down.out_features)
                           for f in model.ffns),
                "head": 2.0 * model.head.in_features * model.head.out_features}
