"""Built-in plugin: TTT layers (Sun et al. 2024), TTT-Linear and TTT-MLP."""

from lengen import hookimpl


@hookimpl
def lengen_register_architectures(registry):
    registry.add(
        "ttt",
        "lengen_ttt.model:TTT",
        description="TTT-Linear LM: fast weights trained at test time by mini-batch gradient steps (dual form), "
                    "constant-size state, streams exactly",
    )
    registry.add(
        "ttt-linear",
        "lengen_ttt.model:TTT",
        description="TTT-Linear: the inner model is a linear map per head, updated every K = 16 tokens",
        defaults={"inner": "linear"},
    )
    registry.add(
        "ttt-mlp",
        "lengen_ttt.model:TTT",
        description="TTT-MLP: the inner model is a 2-layer GELU MLP (4x) per head, updated every K = 16 tokens",
        defaults={"inner": "mlp"},
    )
