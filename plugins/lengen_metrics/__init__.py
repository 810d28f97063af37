"""Built-in plugin: the core length-generalization metrics."""

from lengen import hookimpl


@hookimpl
def lengen_register_metrics(registry):
    registry.add("ppl", "lengen_metrics.core:PositionPerplexity",
                 description="Perplexity at k x W (bucket of tokens ending there), by position, ratio to 1 x W, extrapolation horizon")
    registry.add("length", "lengen_metrics.core:LengthPerplexity",
                 description="Perplexity of whole sequences against evaluation length L (a grid of multiples of W)")
    registry.add("context", "lengen_metrics.core:ContextUtilization",
                 description="Perplexity of fixed target tokens against the context made available (0.25..20 x W)")
    registry.add("recall", "lengen_metrics.core:RecallByDistance",
                 description="Recall accuracy by distance to the answer's last statement, within and beyond W")
    registry.add("excess", "lengen_metrics.core:ExcessLoss",
                 description="Excess NLL over the Bayes-optimal predictor (synthetic data)")
    registry.add("bpc", "lengen_metrics.core:BitsPerCharacter",
                 description="Bits per character (char tokenizers) or per byte (byte tokenizers) at k x W and overall")
    registry.add("unigram", "lengen_metrics.core:UnigramReference",
                 description="Perplexity of a unigram model fit on the training split, as a reference")
