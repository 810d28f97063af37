"""The results store: one folder per run, one record per (architecture, seed).

Layout::

    results/<run id>/run.json                    what was asked, status, timings, every job's outcome
    results/<run id>/heartbeat.json              while running: pid, host, time, current job and step
    results/<run id>/<arch>/seed<k>/record.json  metrics with intervals + full provenance
    results/<run id>/<arch>/seed<k>/model.safetensors
    results/<run id>/<arch>/seed<k>/scores.npz   per-token NLL and correctness (paired tests)
    results/<run id>/ppl_by_position.png

Every file is written to a temporary name and renamed into place, so an interrupted run
leaves whole files or none; files get the permissions the umask allows (like any file the
user creates), not the private 0600 of a temporary file. Reading never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from lengen.api import OutputSpec, PlotSpec

RECORD = "record.json"
RUN = "run.json"
HEARTBEAT = "heartbeat.json"
SCHEMA = 1
#: the sections every record has; one without them is skipped with a warning
RECORD_SECTIONS = {"benchmark": str, "arch": str, "seed": int, "evaluations": dict, "model": dict, "dataset": dict}
#: how the leaderboard treats what the core itself adds to an evaluation (not a metric plugin)
CORE_OUTPUTS = (
    OutputSpec("ratio_*@*W", leaderboard=True, table="last", header="{stem}/this@{x}", digits=3,
               note="ratio_<mode>@kW: that mode's perplexity over this row's on the same tokens (above 1: this "
                    "mode predicts better)."),
    OutputSpec("stat.*@*W", leaderboard=True),  # a model's per-token statistics (Output.stats) at k x W
    OutputSpec("stat.*", leaderboard=True),  # ... and over all tokens (series stay in the record)
)
#: a running run whose heartbeat is older than this (seconds) and whose process cannot be
#: checked (another host) is shown as terminated
STALE_S = 15 * 60


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_save(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` and rename the result into ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create their file 0600
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def new_run_dir(root: Path, benchmark: str, archs: list[str]) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{benchmark}-{'+'.join(archs)}")[:60]
    path = Path(root) / f"{stamp}-{slug}-{secrets.token_hex(2)}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def record_dir(run_dir: Path, arch: str, seed: int) -> Path:
    return Path(run_dir) / arch / f"seed{seed}"


def check_record(rec: Any) -> str | None:
    """Why ``rec`` is not a usable record, or None."""
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
        return f"not a lengen record of schema {SCHEMA}"
    missing = [k for k, t in RECORD_SECTIONS.items() if not isinstance(rec.get(k), t)]
    if missing:
        return f"its {', '.join(missing)} section{'s are' if len(missing) > 1 else ' is'} missing or malformed"
    return None


def read_record(path: Path) -> dict | None:
    """The record at ``path`` (with ``_path`` added), or None with a warning naming the file
    when it cannot be read or lacks a section."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"skipping unreadable record {path}: {exc}", stacklevel=2)
        return None
    why = check_record(rec)
    if why:
        warnings.warn(f"skipping {path}: {why}", stacklevel=2)
        return None
    rec["_path"] = str(path)
    return rec


def iter_records(root: Path) -> Iterator[dict]:
    """Every readable record under ``root``; unreadable ones are warned about and skipped."""
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.glob(f"*/*/*/{RECORD}")):
        rec = read_record(path)
        if rec is not None:
            yield rec


def record_specs(rec: dict) -> list[OutputSpec]:
    """The output specs a record's metrics declared, then the core's; empty for a record
    written before records carried them."""
    declared = [OutputSpec.from_dict(d) for m in (rec.get("metric_plugins") or {}).values() if isinstance(m, dict)
                for d in m.get("outputs") or []]
    return declared + list(CORE_OUTPUTS) if declared else []


def record_plots(rec: dict) -> list[PlotSpec]:
    return [PlotSpec.from_dict(d) for m in (rec.get("metric_plugins") or {}).values() if isinstance(m, dict)
            for d in m.get("plots") or []]


# ---------------------------------------------------------------------------------------
# is a run still running?


def host_name() -> str:
    return socket.gethostname()


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a live
    process from a later one that reused its pid; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused
    return True


def run_state(run_dir: Path, info: dict | None = None) -> tuple[str, str]:
    """``(state, why)`` of a run folder: its recorded status, except that a run recorded as
    ``running`` whose process is gone is ``terminated`` (killed without a chance to say so)."""
    run_dir = Path(run_dir)
    if info is None:
        try:
            info = json.loads((run_dir / RUN).read_text())
        except (OSError, ValueError):
            return "unknown", f"no readable {RUN}"
    status = info.get("status", "unknown")
    if status != "running":
        return status, info.get("error") or ""
    try:
        beat = json.loads((run_dir / HEARTBEAT).read_text())
    except (OSError, ValueError):
        beat = {}
    pid, host = beat.get("pid", info.get("pid")), beat.get("host", info.get("host"))
    last = beat.get("time", info.get("started", 0))
    if pid and host == host_name():
        if not process_alive(int(pid), beat.get("pid_start", info.get("pid_start"))):
            return "terminated", f"its process {pid} is gone (killed?); last heartbeat {_ago(last)}"
        return "running", ""
    if time.time() - last > STALE_S:
        return "terminated", f"no heartbeat for {_ago(last)} (process {pid} on {host})"
    return "running", ""


def _ago(t: float) -> str:
    s = max(0.0, time.time() - (t or 0))
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def iter_runs(root: Path) -> Iterator[tuple[Path, dict, str, str]]:
    """``(run folder, run.json, state, why)`` for every run under ``root``, oldest first
    (see :func:`run_state`); folders without a readable run.json are skipped."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(root.glob(f"*/{RUN}")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            warnings.warn(f"skipping unreadable {path}", stacklevel=2)
            continue
        if not isinstance(info, dict):
            continue
        state, why = run_state(path.parent, info)
        yield path.parent, info, state, why
