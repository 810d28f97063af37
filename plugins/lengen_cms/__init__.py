"""Built-in plugin: the nested CMS-LSTM (seed 002) and its ablations."""

from lengen import hookimpl


@hookimpl
def lengen_register_architectures(registry):
    registry.add(
        "cms-lstm",
        "lengen_cms.model:CMS",
        description="Nested CMS-LSTM: LSTM + 2 FFN levels updated every 1 / 16 / 256 steps with summed gradients "
                    "at lr / period, per-token surprise term, (h, c) state carried",
    )
    registry.add(
        "cms-lstm-flat",
        "lengen_cms.model:CMS",
        description="Ablation of cms-lstm: every level updated every step at the full lr (one timescale)",
        defaults={"periods": [1, 1, 1]},
    )
    registry.add(
        "cms-lstm-nosurprise",
        "lengen_cms.model:CMS",
        description="Ablation of cms-lstm: no surprise term",
        defaults={"surprise": "off"},
    )
