"""Experiment trackers (``lengen run --log-with tensorboard|wandb|mlflow|...``), through accelerate.

The run's ``Accelerator`` is made with ``log_with=[...]`` and the run folder as its project
folder. Each (architecture, seed) job is one tracker run (``init_trackers`` at its start,
``end_training`` at its end), so the trackers overlay architectures and seeds the way they
overlay any runs: tensorboard writes ``<run>/tensorboard/<arch>-seed<k>/lengen/``, wandb a run
named ``<arch>-seed<k>`` grouped by the run id, under ``<run>/wandb``.

What is logged: every optimizer step's ``train/loss``, each auxiliary loss ``train/<name>``,
``train/lr`` and ``train/tokens_per_s``; every evaluated checkpoint's metrics
(``eval/<metric>``, one scalar per position for the position families); when the job ends,
its final metrics in every mode (``final/<mode>/<metric>``) and, on tensorboard, every
recorded curve against position (``curve/<mode>/<series>``, step = position in tokens); and
the record and the run's plots as artifacts (wandb: an artifact; mlflow: run artifacts;
tensorboard: the plots as images and the record as text). Metric names are made portable
(``ppl@1W`` -> ``ppl_at_1W``, ``recall@<=W`` -> ``recall_at_leW``): mlflow allows only
letters, digits and ``_-. :/`` in names.

Nothing here imports torch at import time; a tracker whose package is missing is refused
before the run starts, with the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from lengen.errors import ConfigError, LengenError, did_you_mean

#: the trackers accelerate integrates: name -> (importable packages, any one suffices; the pip
#: install that provides one)
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'lengen[tensorboard]'"),
    "wandb": (("wandb",), "pip install 'lengen[wandb]'"),
    "mlflow": (("mlflow",), "pip install 'lengen[mlflow]'"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "aim": (("aim",), "pip install aim"),
    "clearml": (("clearml",), "pip install clearml"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
}
#: where trackers that write files put them, inside the run folder
TENSORBOARD_DIR = "tensorboard"
PROJECT = "lengen"
#: what wandb needs to reach to run online (``WANDB_BASE_URL`` overrides it)
WANDB_HOST = ("api.wandb.ai", 443)


def parse_log_with(values) -> list[str]:
    """``--log-with`` values (repeatable, comma-separated; ``none`` for none) as tracker names,
    each checked: a name accelerate knows, and its package importable."""
    import importlib.util

    names: list[str] = []
    for v in values or ():
        for name in str(v).split(","):
            name = name.strip().lower()
            if name and name != "none" and name not in names:
                names.append(name)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError("--log-with: " + did_you_mean(name, TRACKERS, kind="tracker"))
        packages, install = TRACKERS[name]
        if not any(importlib.util.find_spec(p) is not None for p in packages):
            raise ConfigError(f"--log-with {name} needs the {packages[0]} package: {install}")
    return names


def portable(name: str) -> str:
    """A metric name every tracker accepts: ``ppl@1W`` -> ``ppl_at_1W``, ``recall@<=W`` ->
    ``recall_at_leW``, ``recall@>W`` -> ``recall_at_gtW``."""
    for a, b in (("<=", "le"), (">=", "ge"), ("<", "lt"), (">", "gt"), ("@", "_at_")):
        name = name.replace(a, b)
    return re.sub(r"[^\w\-. :/]", "_", name)


def _flat(prefix: str, obj: Any, out: dict) -> dict:
    """Nested config -> ``{"a.b": scalar}`` with the types every tracker's hyperparameters take."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (bool, int, float, str)) or obj is None:
        out[prefix] = "null" if obj is None else obj
    else:
        out[prefix] = json.dumps(obj, default=str)
    return out


def _cells(metrics: dict, prefix: str) -> dict[str, float]:
    """``{prefix/<portable name>: value}`` of a record's metric cells that hold a number."""
    out = {}
    for name, cell in (metrics or {}).items():
        value = cell.get("value") if isinstance(cell, dict) else cell
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{portable(name)}"] = float(value)
    return out


def wandb_offline_if_unreachable(say) -> bool:
    """With no network, wandb runs offline: set ``WANDB_MODE=offline`` (unless the user chose a
    mode) and say so. True when it is offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    host, port = WANDB_HOST
    base = os.environ.get("WANDB_BASE_URL")
    if base:
        m = re.match(r"(?:(https?)://)?([^/:]+)(?::(\d+))?", base)
        if m:
            host, port = m.group(2), int(m.group(3) or (80 if m.group(1) == "http" else 443))
    try:
        socket.create_connection((host, port), timeout=3).close()
        return False
    except OSError as exc:
        os.environ["WANDB_MODE"] = "offline"
        say(f"wandb: no network ({host}:{port} unreachable: {exc.strerror or exc}): logging offline "
            f"(WANDB_MODE=offline); upload later with `wandb sync <run folder>/wandb/offline-run-*`")
        return True


class Trackers:
    """The run's trackers: one tracker run per job, through the run's accelerator."""

    def __init__(self, accelerator, names: list[str], run_dir: Path, run_id: str, suite, say=print):
        self.accelerator, self.names, self.run_dir, self.run_id = accelerator, list(names), Path(run_dir), run_id
        self.suite, self.say = suite, say
        self.job: str | None = None
        self.last_step = 0
        self.failed = False  # a tracker raised while logging this job: said once, then this job logs no more
        if self.names:
            self.accelerator.project_configuration.project_dir = str(self.run_dir)
            self.accelerator.project_configuration.logging_dir = str(self.run_dir / TENSORBOARD_DIR)
        if "wandb" in self.names and accelerator.is_main_process:
            wandb_offline_if_unreachable(say)

    @staticmethod
    def accelerator_kwargs(names: list[str], results_dir: Path) -> dict:
        """What ``Accelerator(...)`` needs for ``names``: ``log_with`` and a project folder (the
        results folder until the run folder exists: ``__init__`` points it there)."""
        if not names:
            return {}
        from accelerate.utils import ProjectConfiguration

        return {"log_with": list(names),
                "project_config": ProjectConfiguration(project_dir=str(results_dir), logging_dir=str(results_dir))}

    def start_job(self, arch: str, seed: int, arch_config: dict) -> None:
        """A tracker run for one job, with the suite and the architecture's config as its
        hyperparameters."""
        if not self.names:
            return
        job = f"{arch}-seed{seed}"
        self.last_step, self.failed = 0, False
        # tensorboard: <run>/tensorboard/<arch>-seed<k>/<project>, one folder per job
        self.accelerator.project_configuration.logging_dir = str(self.run_dir / TENSORBOARD_DIR / job)
        config = _flat("", {"run_id": self.run_id, "arch": arch, "seed": seed, "benchmark": self.suite.name,
                            "window": self.suite.window, "train": self.suite.train.model_dump(mode="json"),
                            "eval": self.suite.eval.model_dump(mode="json"), "data": self.suite.data,
                            "model": arch_config}, {})
        init = {"wandb": {"name": job, "group": self.run_id, "dir": str(self.run_dir), "job_type": "train"},
                "mlflow": {"run_name": f"{self.run_id}/{job}"}}
        try:
            self.accelerator.init_trackers(PROJECT, config=config, init_kwargs=init)
        except Exception as exc:  # noqa: BLE001 - a tracker's own error, said in one line
            self.accelerator.trackers.clear()
            raise LengenError(f"--log-with: {type(exc).__name__} while starting the trackers: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}; check the tracker's login or "
                              f"set it offline (e.g. WANDB_MODE=offline)") from None
        self.job = job

    def _log(self, values: dict, step: int) -> None:
        """``accelerator.log``; a tracker's error is said once and the job goes on without it
        (a log that cannot be written must not stop training)."""
        if not values or self.failed:
            return
        try:
            self.accelerator.log(values, step=step)
        except Exception as exc:  # noqa: BLE001 - any tracker's own error
            self.failed = True
            self.say(f"warning: --log-with: {type(exc).__name__} while logging {self.job} at step {step}: {exc}; "
                     "this job logs no more")

    def log_step(self, step: int, info: dict) -> None:
        """One optimizer step: the LM loss, each auxiliary loss, the learning rate, tokens/s."""
        if not self.job:
            return
        from lengen.train import lr_factor

        values = {"train/loss": float(info["loss"]), "train/tokens_per_s": float(info["tokens_per_s"]),
                  "train/lr": self.suite.train.lr * lr_factor(step - 1, self.suite.train)}
        values.update({f"train/{portable(k)}": float(v) for k, v in info.items()
                       if k not in ("loss", "tokens_per_s") and isinstance(v, (int, float))})
        self.last_step = step
        self._log(values, step)

    def log_checkpoint(self, step: int, metrics: dict) -> None:
        """An evaluated checkpoint's metrics (each position of a family its own scalar)."""
        if self.job:
            self._log(_cells(metrics, "eval"), step)

    def end_job(self, record: dict | None, record_path: Path | None, plots: list[Path]) -> None:
        """The job's final metrics and curves, its record and the plots as artifacts; closes the
        tracker run."""
        if not self.job:
            return
        try:
            if record is not None:
                step = int(record.get("train", {}).get("steps") or self.last_step)
                final = {}
                for mode, ev in record.get("evaluations", {}).items():
                    final.update(_cells(ev.get("metrics", {}), f"final/{mode}"))
                self._log(final, step)
                if not self.failed:
                    self._curves(record)
            if not self.failed:
                self._artifacts(record_path, plots)
        except Exception as exc:  # noqa: BLE001 - the record is written; a tracker's error is only said
            self.say(f"warning: --log-with: {type(exc).__name__} while logging the end of {self.job}: {exc}")
        finally:
            # each tracker's finish(), not accelerator.end_training(): that would also end the
            # process group a multi-process run still needs for its next job
            for t in self.accelerator.trackers:
                try:
                    t.finish()
                except Exception as exc:  # noqa: BLE001 - as above
                    self.say(f"warning: --log-with: {type(exc).__name__} while closing {t.name} for {self.job}: {exc}")
            self.accelerator.trackers.clear()
            self.job = None

    def _curves(self, record: dict) -> None:
        """Tensorboard: each recorded curve against position in tokens (its own step axis)."""
        writer = self._tracker("tensorboard")
        if writer is None:
            return
        W = record.get("protocol", {}).get("window") or 1
        for mode, ev in record.get("evaluations", {}).items():
            for name, series in (ev.get("series") or {}).items():
                if not isinstance(series, dict) or series.get("x_unit") != "W":
                    continue
                tag = f"curve/{mode}/{portable(name)}"
                for x, cell in zip(series.get("x", []), series.get("values", [])):
                    if isinstance(cell, dict) and isinstance(cell.get("value"), (int, float)):
                        writer.add_scalar(tag, cell["value"], global_step=int(round(x * W)))
        writer.flush()

    def _tracker(self, name: str):
        for t in self.accelerator.trackers:
            if t.name == name:
                return t.tracker
        return None

    def _artifacts(self, record_path: Path | None, plots: list[Path]) -> None:
        files = ([record_path] if record_path else []) + [p for p in plots if Path(p).is_file()]
        if not files:
            return
        step = self.last_step
        for t in self.accelerator.trackers:
            if t.name == "tensorboard":
                import matplotlib.image

                for p in plots:
                    img = matplotlib.image.imread(str(p))
                    t.tracker.add_image(f"plots/{Path(p).stem}", img[..., :3], global_step=step, dataformats="HWC")
                if record_path:
                    t.tracker.add_text("record", "```\n" + Path(record_path).read_text() + "\n```", global_step=step)
                t.tracker.flush()
            elif t.name == "wandb":
                import wandb

                art = wandb.Artifact(f"{self.run_id}-{self.job}", type="lengen-record")
                for f in files:
                    art.add_file(str(f))
                t.tracker.log_artifact(art)
            elif t.name == "mlflow":
                for f in files:
                    t.log_artifact(str(f), artifact_path=self.job)

