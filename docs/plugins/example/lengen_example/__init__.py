"""lengen-example: registers its components with lengen's hooks.

This module is imported when lengen loads its plugins, so it stays light: no torch here.
The model lives in ``lengen_example.model`` and is imported only when someone uses it.
"""

import json
import os
import time

from lengen import hookimpl


@hookimpl
def lengen_register_architectures(registry):
    registry.add(
        "gru",
        "lengen_example.model:GRU",  # "module:attr", imported on first use
        description="GRU language model with its hidden state carried (example plugin)",
    )


@hookimpl
def lengen_register_benchmarks(registry):
    registry.add(
        "gru-tiny",
        {
            "description": "Synthetic language at W = 32 with a small GRU (example plugin)",
            "window": 32,
            "archs": ["gru"],
            "data": {"n_filler": 32, "p_set": 0.2, "p_get": 0.25, "p_recent": 0.7},
            "train": {"steps": 200, "batch_size": 16, "lr": 3e-3, "state_passing": True},
            "eval": {"length": 10, "positions": [1, 2, 5, 10], "sequences": 32, "bucket": 8},
            "arch": {"gru": {"d_model": 64}, "sw": {"d_model": 64, "n_heads": 4}},
        },
        description="Synthetic language at W = 32 with a small GRU (example plugin)",
    )


@hookimpl
def lengen_run_end(event):
    path = os.environ.get("LENGEN_EXAMPLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), "run": str(event.run_dir), "benchmark": event.benchmark,
                                "status": event.status, "records": len(event.records)}) + "\n")
