"""The study "does MLTP improve generalisation on MNIST-1D?" as a list of ``torch-mltp compare`` commands.

``python -m torch_mltp.experiments.study`` runs them one after another from the repository root: the runs
(with their checkpoints) go to ``runs/study/<name>/``, each comparison's summary (results.json without the
per-epoch histories, table.md and, for the four main comparisons, the figures) to ``docs/results/<name>/``,
and each sensitivity sweep's table over its values to ``docs/results/sweep-<model>-<knob>/table.md``.
Options it does not know (``--seeds 0 --epochs 1 --limit-train-batches 2``, ``--data-root``) are options
of ``torch-mltp compare`` for every comparison, so that the same driver runs as a quick smoke test.
``--list`` prints the commands without running them. A comparison that fails is reported and the next
one runs.

The sweeps vary one MLTP setting at a time: every setting on the MLP, and on the CNN (4,000 and 1,000
samples), whose learned alphas turn negative, the alphas kept >= 0. Standard training does not use these
settings: every sweep takes its standard runs, and its preset value's rows, from its main comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from torch_mltp.data import DatasetError

from .cli import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, build_parser, messages_to_stdout
from .cli import _run_options as cli_run_options
from .comparison import compare, markdown_table, write_outputs
from .recipes import Recipe, recipe_for
from .runs import ExperimentError
from .training import Experiment, RunOptions

log = logging.getLogger(__name__)

DATASET = "mnist1d"
SEEDS = tuple(range(20))
LOW_DATA = {"train_samples": 1000, "epochs": 150, "milestones": (100,)}
"""1,000 training samples are 8 steps per epoch: 150 epochs (lr / 10 after 100) bring standard training to
its plateau, as the preset's 100 epochs of 32 steps do on the 4,000."""
SUMMARY_FILES = ("table.md", "accuracy.png", "alphas.png", "grad_cosine.png")
"""What a comparison's summary holds besides results.json (the figures last)."""
RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(Recipe))


def value_text(name: str, value: Any) -> str:
    """A setting's value as ``torch-mltp compare`` takes it (a steps scale with two decimals)."""
    if name == "steps_scale":
        return f"{value:.2f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_words(settings: Mapping[str, Any]) -> List[str]:
    """``settings`` as options of ``torch-mltp compare``, in their order: ``{"milestones": (100,)}`` is
    ``--milestones 100``, an empty tuple the option alone."""
    words = []
    for name, value in settings.items():
        words.append("--" + name.replace("_", "-"))
        words += [value_text(name, item) for item in (value if isinstance(value, tuple) else (value,))]
    return words


def data_root(given: Optional[str]) -> str:
    """The data folder as ``torch-mltp`` finds it: ``given``, else ``$TORCH_MLTP_DATA``, else the default."""
    return given or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT


@dataclass(frozen=True)
class Comparison:
    """One comparison of a study: procedures x seeds of one MNIST-1D model on the model's recipe with
    ``settings``; its runs go to ``<runs root>/<name>``."""

    name: str
    model: str
    procedures: Tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Recipe overrides (fields of ``Recipe``), ``steps_scale`` and ``cosine_every``, by the names of the
    options of ``torch-mltp compare``, in the order of its command line."""
    baseline: Optional[str] = None
    """The comparison whose standard runs this one shares (``--baseline-dir``)."""
    figures: bool = True
    """Copy the figures to the results folder too (else they stay in the runs folder)."""
    seeds: Tuple[int, ...] = SEEDS

    def command(self, runs_root: Path) -> str:
        """The equivalent ``torch-mltp compare`` command."""
        words = ["torch-mltp", "compare", "--dataset", DATASET, "--model", self.model]
        words += ["--procedures", *self.procedures, *option_words(self.settings)]
        words += ["--seeds", *map(str, self.seeds), "--threads", "1", "--out", str(runs_root / self.name)]
        if self.baseline is not None:
            words += ["--baseline-dir", str(runs_root / self.baseline)]
        return shlex.join(words)

    def settings_with(self, args: argparse.Namespace) -> Dict[str, Any]:
        """The comparison's settings, overridden by the options given on the command line."""
        return {**self.settings, **{name: getattr(args, name) for name in args.given}}


def compare_options(extra: Sequence[str]) -> argparse.Namespace:
    """``extra`` read as options of ``torch-mltp compare``; ``given``: the names of those that differ from
    their defaults (they override a comparison's own settings)."""
    parser = build_parser()
    defaults = vars(parser.parse_args(["compare"]))
    args = parser.parse_args(["compare", *extra])
    args.given = {name for name, value in vars(args).items() if value != defaults[name]}
    return args


def experiment_of(comparison: Comparison, args: argparse.Namespace) -> Experiment:
    """The comparison's recipe with its settings and then the given options applied (as the command line
    applies them: ``--steps-scale`` last)."""
    settings = comparison.settings_with(args)
    overrides = {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in settings.items()
        if name in RECIPE_FIELDS
    }
    recipe = recipe_for(DATASET, comparison.model).replace(**overrides)
    if settings.get("steps_scale") is not None:
        recipe = recipe.scaled(settings["steps_scale"])
    return Experiment(DATASET, comparison.model, recipe, args.limit_train_batches, args.limit_test_batches)


def run_options(comparison: Comparison, args: argparse.Namespace) -> RunOptions:
    """How ``torch-mltp compare`` with the given options runs the comparison."""
    return dataclasses.replace(
        cli_run_options(args, log_epochs=False),
        data_root=data_root(args.data_root),
        cosine_every=comparison.settings_with(args).get("cosine_every", args.cosine_every),
    )


def run_comparison(comparison: Comparison, runs_root: Path, args: argparse.Namespace) -> None:
    """Train the comparison (on one thread unless ``--threads`` says otherwise) and write its outputs to
    its runs folder, as ``torch-mltp compare`` does."""
    seeds = args.seeds if "seeds" in args.given else comparison.seeds
    baseline = None if comparison.baseline is None else runs_root / comparison.baseline
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        result = compare(
            experiment_of(comparison, args),
            comparison.procedures,
            seeds,
            runs_root / comparison.name,
            run_options(comparison, args),
            baseline_root=baseline,
        )
    finally:
        torch.set_num_threads(previous_threads)
    write_outputs(runs_root / comparison.name, [result])


MLP_PROCEDURES = ("standard", "mltp", "mltp_fo")
"""Every layer of the MLP is an ``nn.Linear``: ``mltp_fc`` is ``mltp`` there (bit-identical runs), and
``mltp_conv`` has no layer to act on."""
CNN_PROCEDURES = ("standard", "mltp", "mltp_conv", "mltp_fc", "mltp_fo")
MAIN = tuple(
    Comparison(f"{short}-n{samples}", f"mnist1d_{short}", procedures, regime)
    for samples, regime in ((4000, {}), (1000, LOW_DATA))
    for short, procedures in (("mlp", MLP_PROCEDURES), ("cnn", CNN_PROCEDURES))
)
"""The main comparisons: the MLP and the CNN on 4,000 and on 1,000 training samples."""


@dataclass(frozen=True)
class Sweep:
    """One MLTP setting (a field of ``Recipe``) varied over ``values`` with the model and data of the main
    comparison ``main``, whose standard runs it shares; ``preset`` is that comparison's value of it."""

    setting: str
    preset: Any
    values: Tuple[Any, ...]
    main: Comparison = MAIN[0]
    procedures: Tuple[str, ...] = MLP_PROCEDURES
    prefix: str = "mlp"
    """The comparisons are named ``<prefix>-<knob>-<value>``, the table ``sweep-<prefix>-<knob>``, where
    the knob is the setting's option (``alpha-mean``)."""

    @property
    def stem(self) -> str:
        return f"{self.prefix}-{self.setting.replace('_', '-')}"

    @property
    def name(self) -> str:
        return f"sweep-{self.stem}"

    def comparison(self, value: Any) -> Comparison:
        return Comparison(
            f"{self.stem}-{value_text(self.setting, value)}",
            self.main.model,
            self.procedures,
            {**self.main.settings, self.setting: value},
            baseline=self.main.name,
            figures=False,
        )

    def label(self, value: Any) -> str:
        return " ".join(option_words({self.setting: value})) + (" (preset)" if value == self.preset else "")


CNN_SWEEP_PROCEDURES = ("standard", "mltp", "mltp_conv", "mltp_fo")
"""The procedures whose alphas turn negative on the CNN (``mltp_fc``'s do not)."""
SWEEPS = (
    Sweep("eta", 1.0, (0.5, 2.0)),
    Sweep("alpha_mean", 0.001, (0.01, 0.05, 0.2)),
    Sweep("alpha_policy", "learned", ("nonnegative", "fixed")),
    Sweep("alpha_lr", "tied", (0.001, 0.0001)),
    *(
        Sweep("alpha_policy", "learned", ("nonnegative",), main, CNN_SWEEP_PROCEDURES, prefix=main.name)
        for main in (MAIN[1], MAIN[3])
    ),
)
"""The MLP's sensitivity to each MLTP setting; on the CNN, whose learned alphas turn negative, the same
comparisons with the alphas kept >= 0."""


def comparisons() -> List[Comparison]:
    """Every comparison of the study, in the order the driver runs them (the baseline first)."""
    return [*MAIN, *(sweep.comparison(value) for sweep in SWEEPS for value in sweep.values)]


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_json(path: Path, payload: dict) -> Path:
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def write_summary(run_folder: Path, results_folder: Path, figures: bool = True) -> List[Path]:
    """Copy a comparison's summary from ``run_folder`` to ``results_folder``: results.json without the
    per-epoch histories of the runs (they stay in ``run_folder``), table.md and (``figures``) the
    figures."""
    result = json.loads((run_folder / "results.json").read_text())
    result.pop("runs", None)
    written = [write_json(results_folder / "results.json", result)]
    for name in SUMMARY_FILES if figures else SUMMARY_FILES[:1]:
        if (run_folder / name).exists():
            written.append(Path(shutil.copy2(run_folder / name, results_folder / name)))
    return written


def sweep_table(sweep: Sweep, results_root: Path) -> Optional[str]:
    """One table over the values of ``sweep`` from the summaries in ``results_root``: the preset value's
    rows (standard included) from its main comparison, then the MLTP rows of each other value.
    ``None`` while a summary is missing."""
    folders = [(sweep.main.name, sweep.preset), *((sweep.comparison(v).name, v) for v in sweep.values)]
    if not all((results_root / folder / "results.json").exists() for folder, _ in folders):
        return None
    rows = []
    for index, (folder, value) in enumerate(folders):
        result = json.loads((results_root / folder / "results.json").read_text())
        wanted = sweep.procedures if index == 0 else sweep.procedures[1:]
        procedures = [procedure for procedure in result["procedures"] if procedure in wanted]
        rows.append({**result, "procedures": procedures, "label": sweep.label(value)})
    return markdown_table(rows, first_column="setting")


def run_study(
    selected: Sequence[Comparison], runs_root: Path, results_root: Path, extra: Sequence[str]
) -> List[str]:
    """Run ``selected`` one after another, each followed by its summary, then the sweep tables whose
    summaries are complete; returns the names of the comparisons that failed."""
    failed = run_comparisons(selected, runs_root, results_root, extra)
    for sweep in SWEEPS:
        table = sweep_table(sweep, results_root)
        if table is not None:
            write_text(results_root / sweep.name / "table.md", table)
    return failed


@contextlib.contextmanager
def claimed(lock: Path) -> Iterator[bool]:
    """Whether this process holds ``lock`` (an exclusive, non-blocking ``flock``) for the ``with`` block.
    The system releases it when the process ends, however it ends. Without ``fcntl`` (Windows) every
    claim succeeds."""
    if fcntl is None:
        yield True
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True  # closing the file releases the lock


def named(selected: Sequence[Comparison], names: Optional[Sequence[str]]) -> List[Comparison]:
    """The comparisons of ``selected`` that ``names`` names, in their order (all of them when ``names`` is
    ``None``); ``ValueError`` for a name that is not among them."""
    if names is None:
        return list(selected)
    unknown = sorted(set(names) - {comparison.name for comparison in selected})
    if unknown:
        choices = ", ".join(comparison.name for comparison in selected)
        raise ValueError(f"unknown comparison(s) {', '.join(unknown)}; choose from {choices}")
    return [comparison for comparison in selected if comparison.name in names]


def run_comparisons(
    selected: Sequence[Comparison], runs_root: Path, results_root: Path, extra: Sequence[str]
) -> List[str]:
    """Run ``selected`` one after another (``extra``: options of ``torch-mltp compare`` for each), each
    followed by its summary in ``results_root``; returns the names of the comparisons that failed.

    Each comparison is claimed first (``<runs root>/<name>.lock``): one that another process is running
    is skipped, so that processes started with the same command share the work."""
    args = compare_options(extra)
    failed = []
    for index, comparison in enumerate(selected, start=1):
        with claimed(runs_root / f"{comparison.name}.lock") as mine:
            if not mine:
                log.info("== [%d/%d] %s: another process runs it", index, len(selected), comparison.name)
                continue
            command = " ".join([comparison.command(runs_root), shlex.join(extra)]).strip()
            log.info("== [%d/%d] %s: %s", index, len(selected), comparison.name, command)
            try:
                run_comparison(comparison, runs_root, args)
            except (DatasetError, ExperimentError) as error:
                log.error("%s: %s", comparison.name, error)
                failed.append(comparison.name)
                continue
            write_summary(runs_root / comparison.name, results_root / comparison.name, comparison.figures)
    return failed


def driver_parser(module: str, about: str, runs: str, results: str, only: str) -> argparse.ArgumentParser:
    """The command line of a study's driver ``module``: ``--only`` (help ``only``), ``--runs-root``
    (default ``runs``) and ``--results-root`` (default ``results``: the summaries)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m torch_mltp.experiments.{module}",
        description=f"{about} Other options are options of torch-mltp compare for every comparison.",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help=only)
    parser.add_argument("--runs-root", type=Path, default=Path(runs), help=f"default: {runs}")
    parser.add_argument(
        "--results-root", type=Path, default=Path(results), help=f"summaries; default: {results}"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    about = "Run the MNIST-1D study's comparisons one after another (see docs/results.md)."
    parser = driver_parser("study", about, "runs/study", "docs/results", "run only these comparisons")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args, extra = parser.parse_known_args(argv)
    try:
        selected = named(comparisons(), args.only)
    except ValueError as error:
        parser.error(str(error))
    if args.list:
        for comparison in selected:
            print(comparison.command(args.runs_root))
        return 0
    with messages_to_stdout():
        failed = run_study(selected, args.runs_root, args.results_root, extra)
    if failed:
        print(f"failed: {', '.join(failed)} (the messages above say why)", file=sys.stderr)
        return 1
    print(f"summaries in {args.results_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
