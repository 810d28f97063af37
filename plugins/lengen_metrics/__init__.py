"""Built-in plugin: the core length-generalization metrics."""

from lengen import hookimpl


@hookimpl
def lengen_register_metrics(registry):
    registry.add("ppl", "lengen_metrics.core:PositionPerplexity",
                 description="Perplexity at k x W (bucket of tokens ending there), by position, and its ratio to 1 x W")
    registry.add("recall", "lengen_metrics.core:RecallByDistance",
                 description="Recall accuracy by distance to the answer's last statement, within and beyond W")
    registry.add("excess", "lengen_metrics.core:ExcessLoss",
                 description="Excess NLL over the Bayes-optimal predictor (synthetic data)")
    registry.add("unigram", "lengen_metrics.core:UnigramReference",
                 description="Perplexity of a unigram model fit on the training split, as a reference")
