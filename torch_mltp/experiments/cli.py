"""The ``torch-mltp`` command line: ``train``, ``compare`` and ``reproduce``.

Every command writes under ``runs/<command>/`` unless ``--out`` says otherwise, in a folder named after
the data set, the model and every setting given on the command line (:func:`default_out`). Every option
is checked before anything runs: a bad value ends the command with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence

import torch

from torch_mltp import __version__
from torch_mltp.data import DATASET_NAMES, DatasetError, DataSplits, load_dataset
from torch_mltp.models import MODEL_NAMES

from . import decision, distributed
from .comparison import compare, run_dir_name, write_outputs
from .recipes import (
    ALL_PROCEDURES,
    ALPHA_POLICIES,
    DEFAULT_MODELS,
    DEFAULT_SEEDS,
    MLTP_MODES,
    PROCEDURES,
    TABLES,
    Recipe,
    recipe_for,
)
from .reproduce import reproduce, table_rows
from .runs import written_by
from .sources import folder_name, is_import_string, load_function, user_data
from .training import (
    DEFAULT_COSINE_EVERY,
    TASK_SCOPES,
    Experiment,
    ExperimentError,
    RunOptions,
    train_run,
)

DEFAULT_DATASET = "mnist1d"
DATA_ROOT_ENV = "TORCH_MLTP_DATA"
DEFAULT_DATA_ROOT = "data"
"""The data folder when neither ``--data-root`` nor ``$TORCH_MLTP_DATA`` names one: created when missing
(MNIST-1D is generated into it); a folder that is named must exist unless ``--download`` is given."""


def _checked(convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str):
    """An argparse ``type`` that converts with ``convert`` and refuses values that ``accept`` rejects,
    saying what was ``expected`` (argparse turns it into one line and exit status 2)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
_seed = _checked(int, lambda value: 0 <= value < 2**32, "a seed from 0 to 2**32 - 1")
_positive_float = _checked(float, lambda value: math.isfinite(value) and value > 0, "a positive number")
_non_negative_float = _checked(float, lambda value: math.isfinite(value) and value >= 0, "a number >= 0")
_momentum = _checked(float, lambda value: 0 <= value < 1, "a momentum from 0 up to (not including) 1")
_fraction = _checked(float, lambda value: 0 < value < 1, "a fraction between 0 and 1 (both excluded)")

MIN_MLTP_BATCH = 4
"""MLTP splits a batch into two tasks (a batch of 33 into 17 and 16): at least 2 samples each."""

_RECIPE_OPTIONS: Dict[str, Dict[str, Any]] = {
    "epochs": dict(type=_positive_int),
    "batch_size": dict(
        type=_positive_int,
        help=f"at least {MIN_MLTP_BATCH} with MLTP, which splits it into two tasks (33 = 17 + 16)",
    ),
    "optimizer": dict(choices=("adam", "sgd")),
    "lr": dict(type=_positive_float, help="initial learning rate (also the alphas' unless --alpha-lr)"),
    "lr_decay": dict(type=_positive_float, help="factor applied at each milestone"),
    "momentum": dict(type=_momentum, help="SGD momentum"),
    "weight_decay": dict(type=_non_negative_float),
    "alpha_mean": dict(type=_non_negative_float, help="mean of the initial alphas"),
    "alpha_std": dict(type=_non_negative_float, help="standard deviation of the initial alphas"),
    "eta": dict(type=_non_negative_float, help="weight of the task-j loss"),
    "train_samples": dict(
        type=_positive_int,
        metavar="N",
        help="train on the same N samples for every procedure and seed (default: all)",
    ),
    "alpha_policy": dict(
        choices=ALPHA_POLICIES,
        help="learned: as in the paper (default); nonnegative: learned, clamped at >= 0; nonpositive: "
        "learned, clamped at <= 0 and drawn from N(-mean, std); fixed: kept at their initial values",
    ),
    "alpha_lr": dict(
        type=_positive_float, help="learning rate of learned alphas (default: --lr); the schedule scales both"
    ),
    "sam_rho": dict(type=_non_negative_float, help="radius of SAM's neighbourhood (default 0.05)"),
    "val_fraction": dict(
        type=_fraction,
        metavar="F",
        help="hold out this part of the training samples, the same for every procedure and seed, and "
        "report val_acc on it each epoch (default: none)",
    ),
    "milestones": dict(
        type=_positive_int, nargs="*", metavar="EPOCH", help="epochs after which --lr-decay multiplies the lr"
    ),
    "steps_scale": dict(
        type=_positive_float,
        metavar="X",
        help="train X times as many epochs, milestones scaled alike (default: 1)",
    ),
}
"""The recipe overrides: each option's ``add_argument`` keywords by its name (``lr_decay``: ``--lr-decay``),
in the order in which :func:`default_out` names them (that of the folders already written)."""


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe overrides (default: the preset of the data set and model)")
    for name, keywords in _RECIPE_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), **keywords)


def _add_run_options(parser: argparse.ArgumentParser, out: str, processes: bool = True) -> None:
    """How and where runs execute; ``out``: the default output folder, as ``--help`` shows it;
    ``processes``: the command runs under torchrun too (``--tasks``, ``--dist-timeout``)."""
    group = parser.add_argument_group("run options")
    group.add_argument(
        "--data-root",
        help=f"folder holding the data sets, which must exist unless --download is given (default: "
        f"${DATA_ROOT_ENV} or ./{DEFAULT_DATA_ROOT}, created when missing)",
    )
    group.add_argument(
        "--download", action="store_true", help="download CIFAR-10/100 when missing (may create --data-root)"
    )
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    group.add_argument(
        "--num-workers", type=_non_negative_int, help="DataLoader workers (default: 0 on CPU, 4 on CUDA)"
    )
    group.add_argument(
        "--threads", type=_positive_int, help="CPU threads for torch (default: 1 for MNIST-1D, else torch's)"
    )
    group.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default: {out}, where <settings> lists every recipe override and --limit-* "
        "option given, e.g. ',epochs=1,lr=0.003', and under torchrun ',processes=N,tasks=T' (',fsdp=True'))",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the runs found in --out and train them anew (default: finished runs with the same "
        "settings are reused, interrupted ones resumed, ones with other settings refused)",
    )
    group.add_argument("--tensorboard", action="store_true", help="also log to <run>/tensorboard")
    if processes:
        group.add_argument(
            "--tasks",
            choices=TASK_SCOPES,
            help="under torchrun: MLTP's two tasks are each process's halves of its batch (local, default) "
            "or the unions of all processes' halves (global, the default and the only one with --fsdp)",
        )
        group.add_argument(
            "--dist-timeout",
            type=_positive_float,
            default=distributed.DEFAULT_TIMEOUT_S,
            metavar="SECONDS",
            help="under torchrun: how long a process waits in a collective for the others before it fails "
            f"(default {distributed.DEFAULT_TIMEOUT_S:.0f})",
        )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="show a progress bar (default: on when stderr is a terminal)",
    )
    group.add_argument(
        "--limit-train-batches", type=_positive_int, metavar="N", help="train on at most N batches per epoch"
    )
    group.add_argument(
        "--limit-test-batches", type=_positive_int, metavar="N", help="evaluate on at most N test batches"
    )
    group.add_argument(
        "--cosine-every",
        type=_non_negative_int,
        default=DEFAULT_COSINE_EVERY,
        metavar="K",
        help="measure the cosine of the two half batches' gradients before every K-th step, logged as "
        f"grad_cosine (it does not change the training; 0: never; default {DEFAULT_COSINE_EVERY})",
    )


def _name_or_function(names: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type``: one of ``names``, or an import string (``module:function``)."""

    def parse(text: str) -> str:
        if text in names or is_import_string(text):
            return text
        named = f"one of {', '.join(names)}, or " if names else ""
        raise argparse.ArgumentTypeError(
            f"expected {named}module:function or path/to/file.py:function, got {text!r}"
        )

    return parse


def _arm(text: str) -> decision.Arm:
    try:
        return decision.Arm.parse(text)
    except ExperimentError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        type=_name_or_function(DATASET_NAMES),
        default=DEFAULT_DATASET,
        help=f"one of {', '.join(DATASET_NAMES)} (default: {DEFAULT_DATASET}), or your function that returns "
        "(train, test) datasets of (input, target) pairs: mypkg.data:make_data or path/to/file.py:make_data",
    )
    default_models = ", ".join(f"{dataset}: {model}" for dataset, model in DEFAULT_MODELS.items())
    parser.add_argument(
        "--model",
        type=_name_or_function(MODEL_NAMES),
        help=f"one of {', '.join(MODEL_NAMES)} (default per data set: {default_models}), or your function "
        "of no argument that returns an nn.Module (called after the seed is set): mypkg.models:make_model "
        "or path/to/file.py:make_model",
    )
    parser.add_argument(
        "--loss",
        type=_name_or_function(()),
        help="your loss(output, target) returning the batch's mean, in place of cross-entropy: "
        "mypkg.losses:my_loss or path/to/file.py:my_loss",
    )


MAIN_JOB_DURATION = "about 6 minutes on 2 CPU cores"
"""How long ``torch-mltp compare`` takes with its defaults (5 min 40 s on a quiet 2-core machine, one torch
thread); ``compare --help`` and the README say it."""
RUNS = Path("runs")
TRAIN_OUT = "runs/train/<dataset>-<model><settings>/<procedure>-seed<seed>"
COMPARE_OUT = "runs/compare/<dataset>-<model><settings>"
REPRODUCE_OUT = "runs/reproduce/<table><settings>"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``torch-mltp train: error: ...``, exit status 2), from one process."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{self.prog}: error: {message}")
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torch-mltp",
        description="Meta-learning based training procedure (MLTP, Deng & Zhang): does it help on your "
        "model, and the paper's experiments.",
        epilog="Each command writes under runs/<command>/ (runs/train, runs/compare, runs/reproduce) unless "
        "--out is given, in a folder named after its data set, model and settings: see "
        "'torch-mltp <command> --help'.",
    )
    parser.add_argument("--version", action="version", version=f"torch-mltp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,reproduce}")
    _add_train_command(commands)
    _add_compare_command(commands)
    _add_reproduce_command(commands)
    return parser


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train",
        help="one run: data set, model, procedure, seed",
        description=f"One run. Writes to {TRAIN_OUT} unless --out is given; running the same command "
        "again resumes it.",
    )
    _add_experiment_options(train)
    train.add_argument(
        "--procedure",
        choices=ALL_PROCEDURES,
        default="mltp",
        help="default: mltp; sam: pytorch-optimizer's SAM around the recipe's optimizer",
    )
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, or fail (the same command resumes too)",
    )
    _add_recipe_options(train)
    _add_run_options(train, TRAIN_OUT)
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 instead of replicating it with DDP (standard or "
        "mltp_fo, --tasks global, no gradient cosine; docs/distributed.md)",
    )


def _add_compare_command(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="does MLTP help on this model? the arms on paired seeds, a verdict, a table, a figure, JSON",
        description=f"Without arguments: MNIST-1D's CNN, {MAIN_JOB_DURATION}. Runs the arms (--arms) on "
        "paired seeds with a budget chosen on a validation split, and ends with the paired differences, "
        "their Holm-adjusted p-values and a verdict (docs/results.md, 'Reading the verdict'). With "
        "--procedures: those procedures on the seeds with the recipe's budget and the study's table "
        f"instead. Writes to {COMPARE_OUT} unless --out is given; running the same command again reuses "
        "the finished runs and resumes the others.",
    )
    _add_experiment_options(compare)
    _add_decision_options(compare)
    compare.add_argument(
        "--procedures",
        nargs="+",
        choices=ALL_PROCEDURES,
        metavar="PROCEDURE",
        help=f"instead of the decision: these procedures with the recipe's budget ({', '.join(PROCEDURES)}, "
        "sam), seeds 0 1 2 unless --seeds, the study's table (docs/results.md)",
    )
    compare.add_argument(
        "--baseline-dir",
        type=Path,
        metavar="DIR",
        help="with --procedures: keep the standard runs in DIR instead of --out, to share them with "
        "comparisons that differ only in MLTP settings (--eta, --alpha-*)",
    )
    _add_recipe_options(compare)
    _add_run_options(compare, COMPARE_OUT)


def _add_decision_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the decision (without --procedures)")
    group.add_argument(
        "--arms",
        nargs="+",
        type=_arm,
        metavar="ARM",
        help="PROCEDURE, or PROCEDURE@OTHER to train it as long as OTHER's measured cost (default: "
        f"{' '.join(decision.DEFAULT_ARMS)}); procedures: {', '.join(ALL_PROCEDURES)}",
    )
    seeds = " ".join(map(str, decision.DEFAULT_SEEDS))
    group.add_argument("--seeds", nargs="+", type=_seed, help=f"the paired seeds (default: {seeds})")
    group.add_argument(
        "--tuning-seeds",
        nargs="+",
        type=_seed,
        default=list(decision.DEFAULT_TUNING_SEEDS),
        help="the seeds that choose the budget (and SAM's radius) on the validation split (default: "
        f"{' '.join(map(str, decision.DEFAULT_TUNING_SEEDS))})",
    )
    group.add_argument(
        "--budgets",
        nargs="+",
        type=_positive_float,
        default=list(decision.DEFAULT_BUDGETS),
        metavar="X",
        help="candidate budgets, as scales of the recipe's schedule; standard training's best on the "
        f"validation split is the budget (default: {' '.join(f'{b:g}' for b in decision.DEFAULT_BUDGETS)})",
    )
    group.add_argument(
        "--sam-rhos",
        nargs="+",
        type=_non_negative_float,
        metavar="RHO",
        help="SAM's candidate radii, chosen on the validation split when there are several (default: "
        "--sam-rho, else 0.05)",
    )
    group.add_argument(
        "--tuning-val-fraction",
        type=_fraction,
        default=decision.Plan.val_fraction,
        metavar="F",
        help="the part of the training samples that the tuning runs hold out for validation (default "
        f"{decision.Plan.val_fraction})",
    )


def _add_reproduce_command(commands) -> None:
    tables = "; ".join(
        f"{name} ({spec.dataset}: {', '.join(model for model, _ in spec.rows)})"
        for name, spec in TABLES.items()
    )
    reproduce = commands.add_parser(
        "reproduce",
        help="one of the paper's tables with its settings",
        usage="torch-mltp reproduce {table1,table2,table3} [--dry-run] [options]",
        description=f"Runs the paper's grid for one table ({tables}), in one process. Start with "
        "'torch-mltp reproduce table1 --dry-run': the plan, whether the data set is where --data-root "
        f"points, and a time estimate, in seconds. Writes to {REPRODUCE_OUT} unless --out is given.",
    )
    reproduce.add_argument(
        "table", nargs="?", choices=sorted(TABLES), help="the paper's table to reproduce: " + tables
    )
    reproduce.add_argument(
        "--seeds", nargs="+", type=_seed, default=list(DEFAULT_SEEDS), help="default: 0 1 2"
    )
    reproduce.add_argument(
        "--dry-run", action="store_true", help="print the plan, the data check and the time estimate only"
    )
    reproduce.add_argument(
        "--timing-steps",
        type=_non_negative_int,
        default=1,
        help="steps of standard training timed per model for the estimate (0: no estimate; default 1)",
    )
    _add_recipe_options(reproduce)
    _add_run_options(reproduce, REPRODUCE_OUT, processes=False)


def _usage_problem(args: argparse.Namespace) -> Optional[str]:
    """What the options say that argparse cannot check alone: a table for ``reproduce``, a batch that
    MLTP can split into two tasks of at least 2 samples, a user's data set with a user's model, the
    decision in one process, ``--baseline-dir`` with ``--procedures``."""
    if args.command == "reproduce" and args.table is None:
        return (
            f"name the table to reproduce, one of {', '.join(sorted(TABLES))}, "
            "e.g. 'torch-mltp reproduce table1 --dry-run'"
        )
    mltp = any(MLTP_MODES[procedure] is not None for procedure in _procedures(args))
    if mltp and args.batch_size is not None and args.batch_size < MIN_MLTP_BATCH:
        return (
            f"argument --batch-size: MLTP splits each batch into two tasks of at least 2 samples: expected "
            f"{MIN_MLTP_BATCH} or more, got {args.batch_size}"
        )
    user_dataset = args.command != "reproduce" and is_import_string(args.dataset)
    if user_dataset and not (args.model and is_import_string(args.model)):
        return (
            "argument --model: with your own data set (--dataset module:function), give your model too "
            "(--model module:function): the registered models are shaped for the registered data sets"
        )
    if args.command == "compare" and args.procedures is None:
        if args.baseline_dir is not None:
            return (
                "argument --baseline-dir: goes with --procedures (the decision keeps all its runs in --out)"
            )
        if distributed.launched_by_torchrun():
            return "the decision runs in one process; under torchrun, compare --procedures"
    return None


def _procedures(args: argparse.Namespace) -> List[str]:
    """The procedures a command trains."""
    if args.command == "train":
        return [args.procedure]
    if args.command == "compare":
        return args.procedures or [arm.procedure for arm in _arms(args)]
    return [procedure for _, row in TABLES[args.table].rows for procedure in row]


def _arms(args: argparse.Namespace) -> List[decision.Arm]:
    return args.arms or [decision.Arm.parse(spec) for spec in decision.DEFAULT_ARMS]


def _milestones_warning(args: argparse.Namespace) -> Optional[str]:
    """A ``--milestones`` epoch at or after the last epoch, where the learning rate never drops (checked
    before ``--steps-scale``, which stretches both alike). A warning, not an error: a run trained for
    part of its schedule may be extended later with more ``--epochs``, and then reaches it."""
    if not args.milestones:
        return None
    if args.command == "reproduce":
        spec = TABLES[args.table]
        dataset, models = spec.dataset, [model for model, _ in spec.rows]
        epochs = args.epochs or min(recipe_for(dataset, model).epochs for model in models)
    else:
        dataset, epochs = args.dataset, args.epochs or _base_recipe(args).epochs
    late = [milestone for milestone in args.milestones if milestone >= epochs]
    if not late:
        return None
    source = f"--epochs {epochs}" if args.epochs else f"the {dataset} preset"
    return (
        f"argument --milestones: {' '.join(map(str, late))} {'comes' if len(late) == 1 else 'come'} at or "
        f"after the last of the {epochs} epochs ({source}), so the learning rate never drops there (it drops "
        "after each milestone epoch) unless more --epochs extend the run later"
    )


def _resolve_data_root(args: argparse.Namespace) -> Optional[str]:
    """Fill in ``args.data_root``: ``--data-root``, else ``$TORCH_MLTP_DATA``, else ``./data`` (created when
    needed). A folder that is named and not there is a problem, returned, unless ``--download`` may create
    it: a mistyped path would otherwise become a new, empty data folder."""
    named = ""
    if args.data_root is None and os.environ.get(DATA_ROOT_ENV):
        args.data_root, named = os.environ[DATA_ROOT_ENV], f" (from ${DATA_ROOT_ENV})"
    elif args.data_root is None:
        args.data_root = DEFAULT_DATA_ROOT
        return None
    root = Path(args.data_root)
    if root.exists() and not root.is_dir():
        return f"argument --data-root: {root}{named} is not a folder"
    if not root.exists() and not args.download:
        return (
            f"argument --data-root: the folder {root}{named} does not exist: give the folder that holds "
            "the data sets (layouts: docs/data.md), or add --download to create it"
        )
    return None


def _recipe_overrides(args: argparse.Namespace) -> dict:
    """The recipe's fields as the command line gives them (``None``: not given); ``--steps-scale`` is applied
    after them (:func:`_scaled`)."""
    overrides = {name: getattr(args, name) for name in _RECIPE_OPTIONS if name != "steps_scale"}
    if args.milestones is not None:
        overrides["milestones"] = tuple(args.milestones)
    return overrides


def _run_options(args: argparse.Namespace, log_epochs: bool) -> RunOptions:
    return RunOptions(
        data_root=args.data_root,
        download=args.download,
        device=args.device,
        num_workers=args.num_workers,
        tensorboard=args.tensorboard,
        progress=args.progress,
        log_epochs=log_epochs,
        overwrite=args.overwrite,
        require_checkpoint=getattr(args, "resume", False),
        tasks=_tasks(args),
        fsdp=getattr(args, "fsdp", False),
        cosine_every=args.cosine_every,
        command=args.command,
    )


def _tasks(args: argparse.Namespace) -> str:
    """``--tasks``, by default ``global`` with ``--fsdp`` and ``local`` otherwise."""
    return getattr(args, "tasks", None) or ("global" if getattr(args, "fsdp", False) else "local")


def _base_recipe(args: argparse.Namespace) -> Recipe:
    """The data set's preset (for a data set of the user's: :data:`.decision.DEFAULT_RECIPE`); the
    decision keeps MLTP's alphas >= 0 unless ``--alpha-policy`` says otherwise."""
    if is_import_string(args.dataset):
        return decision.DEFAULT_RECIPE
    recipe = recipe_for(args.dataset, args.model or DEFAULT_MODELS[args.dataset])
    deciding = args.command == "compare" and args.procedures is None
    return recipe.replace(alpha_policy="nonnegative") if deciding else recipe


def _scaled(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """The recipe with ``--steps-scale`` applied (after the other overrides)."""
    return recipe if args.steps_scale is None else recipe.scaled(args.steps_scale)


def _experiment(args: argparse.Namespace) -> Experiment:
    """What the command trains; a model or loss of the user's is imported here."""
    model = args.model or DEFAULT_MODELS[args.dataset]
    recipe = _scaled(_base_recipe(args).replace(**_recipe_overrides(args)), args)
    return Experiment(
        args.dataset,
        model,
        recipe,
        args.limit_train_batches,
        args.limit_test_batches,
        make_model=load_function(model, "--model") if is_import_string(model) else None,
        loss=load_function(args.loss, "--loss") if args.loss else None,
        loss_name=args.loss,
    )


def _data(args: argparse.Namespace) -> Optional[DataSplits]:
    """The user's data set (``--dataset module:function``); ``None`` for a registered one, loaded by the
    runs."""
    if not is_import_string(args.dataset):
        return None
    return user_data(load_function(args.dataset, "--dataset"), args.dataset)


def _folder_value(value) -> str:
    """A setting as a folder name shows it: milestones ``(50, 100)`` as ``50-100``, none as ``none``."""
    if isinstance(value, tuple):
        return "-".join(map(str, value)) or "none"
    return str(value)


def default_out(args: argparse.Namespace, processes: distributed.Processes) -> Path:
    """Where a command writes without ``--out``: ``runs/<command>/``, then the data set and model (or the
    table), followed by every setting given on the command line that its runs depend on (recipe
    overrides, ``--limit-*``; under torchrun the number of processes and ``--tasks``), and for ``train``
    the procedure and seed. Two commands share a default folder only when one continues the other."""
    settings = {**_recipe_overrides(args), "steps_scale": args.steps_scale}
    settings.update(limit_train_batches=args.limit_train_batches, limit_test_batches=args.limit_test_batches)
    if processes.distributed:
        settings.update(
            processes=processes.world_size, tasks=_tasks(args), fsdp=getattr(args, "fsdp", None) or None
        )
    suffix = "".join(
        f",{name.replace('_', '-')}={_folder_value(value)}"
        for name, value in settings.items()
        if value is not None
    )
    if args.command == "reproduce":
        return RUNS / "reproduce" / f"{args.table}{suffix}"
    names = (args.dataset, args.model or DEFAULT_MODELS[args.dataset])
    folder = RUNS / args.command / ("-".join(map(folder_name, names)) + suffix)
    return folder / run_dir_name(args.procedure, args.seed) if args.command == "train" else folder


def _run(args: argparse.Namespace) -> None:
    """The command, once its options are checked."""
    processes = distributed.current()
    out = args.out or default_out(args, processes)
    if args.command == "train":
        _train(args, out)
    elif args.command == "reproduce":
        _reproduce(args, out)
    elif args.procedures is None:
        _decide(args, out)
    else:
        result = compare(
            _experiment(args),
            args.procedures,
            args.seeds or list(DEFAULT_SEEDS),
            out,
            _run_options(args, log_epochs=False),
            data=_data(args),
            baseline_root=args.baseline_dir,
        )
        if processes.is_main:  # under torchrun, the main process writes the outputs
            written = write_outputs(out, [result])
            _print_outputs((out / "table.md").read_text(), ", ".join(map(str, written)))


def _print_outputs(table: str, written: str) -> None:
    """How ``compare`` and ``reproduce`` end: a blank line, the table, the files written."""
    print()
    print(table)
    print(f"written: {written}")


def _train(args: argparse.Namespace, out: Path) -> None:
    """One run. A run found finished with the same settings is reused, as ``compare`` does, and the line
    says how to train it again: ``--overwrite`` only for a run that ``train`` wrote."""
    options = _run_options(args, log_epochs=True)
    result = train_run(_experiment(args), args.procedure, args.seed, out, options, _data(args))
    if not result.reused:
        print(f"final test accuracy {result.final['test_acc']:.2f}%; results in {result.run_dir}")
        return
    by = written_by(result.run_dir)
    if by == "train":
        again = "pass --overwrite (which deletes it) or choose another --out"
    else:
        writer = f"torch-mltp {by}" if by else "an earlier command"
        again = f"choose another --out (it holds a result of {writer})"
    final = result.final
    print(
        f"the run in {result.run_dir} is finished: reused, final test accuracy {final['test_acc']:.2f}% "
        f"after {final['epoch']} epochs; to train it again, {again}"
    )


def _decide(args: argparse.Namespace, out: Path) -> None:
    """The decision (:mod:`.decision`): its runs, then the table, the verdict and the files written."""
    experiment = _experiment(args)
    data = _data(args) or load_dataset(args.dataset, args.data_root, download=args.download)
    plan = decision.Plan(
        arms=tuple(_arms(args)),
        seeds=tuple(args.seeds or decision.DEFAULT_SEEDS),
        tuning_seeds=tuple(args.tuning_seeds),
        budgets=tuple(args.budgets),
        sam_rhos=tuple(args.sam_rhos or [experiment.recipe.sam_rho]),
        val_fraction=args.tuning_val_fraction,
    )
    result = decision.decide(experiment, data, plan, out, _run_options(args, log_epochs=False))
    written = decision.write_outputs(result, out)
    _print_outputs(result.table(), ", ".join(map(str, written)))


def _reproduce(args: argparse.Namespace, out: Path) -> None:
    """One of the paper's tables, each row's recipe with ``--steps-scale`` applied."""
    overrides = _recipe_overrides(args)
    rows = []
    for row in table_rows(args.table, overrides, args.limit_train_batches, args.limit_test_batches):
        experiment = dataclasses.replace(row.experiment, recipe=_scaled(row.experiment.recipe, args))
        rows.append(dataclasses.replace(row, experiment=experiment))
    options = _run_options(args, log_epochs=False)
    if reproduce(args.table, rows, args.seeds, out, options, args.timing_steps, args.dry_run) is not None:
        _print_outputs(
            (out / "table.md").read_text(),
            f"{out}/table.md, {out}/results.json and one folder per model with figures",
        )


def _print_error(message: str) -> None:
    """Print the command's error once: under torchrun every process meets the same error (options, data,
    output folder are the same everywhere), and process 0 says it (its rank is known from ``$RANK`` before
    the process group exists)."""
    if not distributed.launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _processes(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun: join the process group for the command; only the main process prints."""
    if not distributed.launched_by_torchrun():
        yield
        return
    if args.command == "reproduce":
        raise ExperimentError("reproduce runs one process; start train or compare with torchrun")
    processes = distributed.start(args.device, args.dist_timeout)
    try:
        with open(os.devnull, "w") as quiet, contextlib.ExitStack() as stack:
            if not processes.is_main:
                stack.enter_context(contextlib.redirect_stdout(quiet))
            yield
    except BaseException:
        distributed.stop(wait_for_the_others=False)  # they may never arrive: leave at once
        raise
    distributed.stop()


class _StdoutHandler(logging.StreamHandler):
    """The handler :func:`messages_to_stdout` adds. A pipe whose reader stopped reading (``| head``) ends
    the command (:func:`main`) instead of printing a logging error for every line that follows."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            raise  # the error being handled
        super().handleError(record)


@contextlib.contextmanager
def messages_to_stdout() -> Iterator[None]:
    """The experiments report progress through ``logging``; the command line prints it. Inside another
    such block (a driver running commands) the outer one prints."""
    logger = logging.getLogger("torch_mltp")
    if any(isinstance(handler, _StdoutHandler) for handler in logger.handlers):
        yield
        return
    handler = _StdoutHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``torch-mltp``; returns the exit status (2: a problem the user can fix)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _usage_problem(args) or _resolve_data_root(args)
    if problem is not None:
        _print_error(f"torch-mltp {args.command}: error: {problem}")
        raise SystemExit(2)  # as argparse ends a usage error
    warning = _milestones_warning(args)
    if warning is not None:
        _print_error(f"torch-mltp {args.command}: warning: {warning}")
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, also into a pipe or a file
    threads = args.threads or (1 if getattr(args, "dataset", None) == "mnist1d" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _processes(args), messages_to_stdout():
            _run(args)
    except (DatasetError, ExperimentError) as err:
        _print_error(f"torch-mltp {args.command}: error: {err}")
        return 2
    except KeyboardInterrupt:
        _print_error(
            f"torch-mltp {args.command}: interrupted; run the same command again to resume from the last "
            "finished epoch"
        )
        return 130
    except BrokenPipeError:  # as a Unix tool ends when its reader stops: quietly, at the next line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 141  # 128 + SIGPIPE
    finally:
        torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
