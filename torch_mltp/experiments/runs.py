"""A run folder: what a run writes, and whether it may be reused or resumed.

Layout::

    config.json     the full configuration, package and torch versions
    metrics.jsonl   one JSON object per epoch (accuracies in percent)
    checkpoint.pt   the state after the last finished epoch
    final.pt        the final model state_dict
    result.json     the final epoch's metrics and the configuration
    tensorboard/    with --tensorboard

Only the main process of a ``torchrun`` run writes; every process reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

import torch

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.pt"
RESULT_FILE = "result.json"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, FINAL_FILE, RESULT_FILE)
EXTENDABLE = "experiment.recipe.epochs"
"""The one setting a stored run may differ in: raising it extends the run."""


class ExperimentError(ValueError):
    """A problem the user can fix (bad combination of settings, conflicting output folder, ...)."""


def json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


class RunFolder:
    """The files of one run under ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- deciding what to do ---------------------------------------------------------------------
    def prepare(
        self,
        config: dict,
        epochs: int,
        overwrite: bool,
        require_checkpoint: bool,
        defaults: Optional[dict] = None,
        ignored: Iterable[str] = (),
        writer: Optional[str] = None,
    ) -> Optional[int]:
        """Check the folder against ``config``; returns the last checkpointed epoch, or ``None`` for a
        fresh start.  ``overwrite`` deletes a previous run first.

        ``defaults`` (nested like ``config``): the value of a setting that a stored configuration lacks
        (it was written before the setting existed). ``ignored``: dotted names of settings that may
        differ (``experiment.recipe.epochs`` always may: a run can be extended). ``writer``: the command
        that asks (``train``, ``compare``, ``reproduce``); a refusal offers ``--overwrite`` only for a run
        that the same command wrote, and otherwise asks for another ``--out``.
        """
        stored = None
        if overwrite:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / TENSORBOARD_DIR, ignore_errors=True)
        elif (self.path / CONFIG_FILE).exists():
            stored = json.loads((self.path / CONFIG_FILE).read_text())
            settings = _with_defaults(stored, defaults or {})
            changed = _differences({key: settings.get(key) for key in config}, config, {EXTENDABLE, *ignored})
            if changed:
                raise ExperimentError(
                    f"{self.path} holds a run with other settings ({'; '.join(changed)}); "
                    + _way_out(stored, writer, "replace it")
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise ExperimentError(
                f"{self.path} exists and is not a run folder (no {CONFIG_FILE}); choose another --out"
            )
        if not (self.path / CHECKPOINT_FILE).exists():
            if require_checkpoint:
                raise ExperimentError(f"--resume: {self.path} holds no {CHECKPOINT_FILE} to continue from")
            return None
        last_epoch = self.load_checkpoint(mmap=True)["epoch"]
        if last_epoch > epochs:
            raise ExperimentError(
                f"{self.path} already trained for {last_epoch} epochs, more than the {epochs} asked for; "
                + _way_out(stored, writer, "start over")
            )
        return last_epoch

    def finished(self, last_epoch: Optional[int], epochs: int) -> bool:
        return last_epoch == epochs and (self.path / RESULT_FILE).exists()

    # -- reading ------------------------------------------------------------------------------------
    def history(self, last_epoch: Optional[int]) -> List[dict]:
        """The metrics of epochs ``1..last_epoch`` (none for a fresh start)."""
        path = self.path / METRICS_FILE
        if last_epoch is None or not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [record for record in records if record["epoch"] <= last_epoch]

    def load_checkpoint(self, mmap: bool = False) -> Dict[str, Any]:
        # on the CPU: the RNG states must stay there; load_state_dict moves the rest to the model's device
        return torch.load(self.path / CHECKPOINT_FILE, map_location="cpu", weights_only=True, mmap=mmap)

    # -- writing (main process only) ------------------------------------------------------------
    def start(self, config: dict, history: List[dict]) -> None:
        """Write the configuration and the metrics kept from a resumed run."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in history))
        _atomic_save(config, self.path / CONFIG_FILE)

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def save_checkpoint(self, checkpoint: dict) -> None:
        _atomic_save(checkpoint, self.path / CHECKPOINT_FILE)

    def finish(self, model_state: dict, result: dict) -> None:
        _atomic_save(model_state, self.path / FINAL_FILE)
        _atomic_save(result, self.path / RESULT_FILE)


def written_by(path: Path) -> Optional[str]:
    """The command (``train``, ``compare``, ``reproduce``) that wrote the run in ``path``, as its
    ``config.json`` records it; ``None`` when it records none."""
    try:
        stored = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stored.get("options", {}).get("command") if isinstance(stored, dict) else None


def _way_out(stored: Optional[dict], writer: Optional[str], overwrite_does: str) -> str:
    """What to pass instead: ``--overwrite`` only for a run that the same command wrote (deleting it
    deletes nothing of another command's), else another ``--out`` to keep it."""
    written_by = (stored or {}).get("options", {}).get("command")
    if stored is not None and written_by == writer:
        return f"pass --overwrite to {overwrite_does} or choose another --out"
    by = f"torch-mltp {written_by}" if written_by else "an earlier command"
    return f"it holds a result of {by}: choose another --out to keep it"


def _with_defaults(stored: dict, defaults: dict) -> dict:
    """``stored`` with every setting of ``defaults`` that it lacks (nested dictionaries merged)."""
    merged = dict(stored)
    for key, default in defaults.items():
        if key not in merged:
            merged[key] = default
        elif isinstance(default, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(merged[key], default)
    return merged


def _differences(stored: dict, wanted: dict, ignored: Set[str], prefix: str = "") -> List[str]:
    found = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, ignored, f"{prefix}{key}.")
        elif old != new and f"{prefix}{key}" not in ignored:
            found.append(f"{prefix}{key}: {old!r} there, {new!r} now")
    return found


def _atomic_save(obj, path: Path) -> None:
    """Write ``obj`` (as JSON to a ``.json`` file, else with ``torch.save``) by replacing ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        temporary.write_text(json.dumps(obj, indent=2) + "\n")
    else:
        torch.save(obj, temporary)
    os.replace(temporary, path)
