"""Built-in plugin: sliding-window attention transformer."""

from lengen import hookimpl


@hookimpl
def lengen_register_architectures(registry):
    registry.add(
        "sw",
        "lengen_sw.model:SlidingWindow",
        description="Sliding-window attention transformer (RoPE, SwiGLU); attends to the last W tokens, O(L x W)",
    )
