"""Built-in plugin: real text (local files, parquet, jsonl, Hugging Face hub datasets).

Importing this module imports nothing heavy: the datasets are registered by
``"module:attr"`` strings and loaded (with numpy, tokenizers, pyarrow or datasets) only
when a suite uses them. See docs/data.md.
"""

from lengen import hookimpl


@hookimpl
def lengen_register_datasets(registry):
    registry.add(
        "text",
        "lengen_text.datasets:TextFiles",
        description="Local text files or globs (--data-dir); one document per file or split by "
                    "WikiText headings, blank lines or a regex; char, byte, BPE or tokenizer.json",
    )
    registry.add(
        "jsonl",
        "lengen_text.datasets:JsonlFiles",
        description="Local JSON-lines files with a text column (--data-dir); one document per row or split by a rule",
    )
    registry.add(
        "parquet",
        "lengen_text.datasets:ParquetFiles",
        description="Local parquet files with a text column (--data-dir); one document per row or split by a rule",
    )
    registry.add(
        "hf",
        "lengen_text.datasets:HubDataset",
        description="A Hugging Face hub dataset by name/config/split (e.g. wikitext-103-raw-v1); "
                    "loads from the local HF cache when the hub is unreachable",
    )
