"""Built-in plugin: the embedded synthetic language (the default dataset, no download)."""

from lengen import hookimpl


@hookimpl
def lengen_register_datasets(registry):
    registry.add(
        "synthetic",
        "lengen_synthetic.language:SyntheticLanguage",
        description="Embedded synthetic language: 2nd-order Markov filler + key-value recall far beyond W, "
                    "with per-token Bayes-optimal NLL",
    )
