"""lengen: does this architecture still work past the length it was trained on?"""

__version__ = "0.1.0"

from lengen.hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl"]
