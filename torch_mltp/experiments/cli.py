"""The ``torch-mltp`` command line: ``train``, ``compare`` and ``reproduce``.

``torch-mltp compare`` without arguments runs the embedded default: MNIST-1D, all five procedures,
three seeds, on the CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from torch_mltp.data import DATASET_NAMES, DatasetError
from torch_mltp.models import MODEL_NAMES

from . import distributed
from .compare import compare, run_dir_name, write_outputs
from .recipes import ALPHA_POLICIES, DEFAULT_MODELS, DEFAULT_SEEDS, PROCEDURES, TABLES, recipe_for
from .reproduce import reproduce, table_rows
from .training import DEFAULT_COSINE_EVERY, TASK_SCOPES, Experiment, ExperimentError, RunOptions, train_run

DEFAULT_DATASET = "mnist1d"
DATA_ROOT_ENV = "TORCH_MLTP_DATA"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe overrides (default: the preset of the data set and model)")
    group.add_argument("--epochs", type=_positive_int)
    group.add_argument(
        "--batch-size", type=_positive_int, help="MLTP splits it into two tasks of half the size"
    )
    group.add_argument(
        "--train-samples",
        type=_positive_int,
        metavar="N",
        help="train on a fixed subset of N training samples, the same for every procedure and seed (the "
        "first N of one permutation drawn with a fixed seed; default: all)",
    )
    group.add_argument("--optimizer", choices=("adam", "sgd"))
    group.add_argument(
        "--lr", type=float, help="initial learning rate (also the alphas' learning rate unless --alpha-lr)"
    )
    group.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        metavar="EPOCH",
        help="epochs after which the learning rate is multiplied by --lr-decay",
    )
    group.add_argument("--lr-decay", type=float)
    group.add_argument("--momentum", type=float, help="SGD momentum")
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--alpha-mean", type=float, help="mean of the initial alphas")
    group.add_argument("--alpha-std", type=float, help="standard deviation of the initial alphas")
    group.add_argument("--eta", type=float, help="weight of the task-j loss")
    group.add_argument(
        "--alpha-policy",
        choices=ALPHA_POLICIES,
        help="learned: as in the paper (default); nonnegative: learned, clamped at >= 0; "
        "fixed: kept at their initial values",
    )
    group.add_argument(
        "--alpha-lr",
        type=_positive_float,
        help="learning rate of learned alphas (default: the same as --lr); the schedule scales both",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run options")
    group.add_argument(
        "--data-root",
        default=os.environ.get(DATA_ROOT_ENV, "data"),
        help=f"folder holding the data sets (default: ${DATA_ROOT_ENV} or ./data)",
    )
    group.add_argument("--download", action="store_true", help="download CIFAR-10/100 when missing")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    group.add_argument(
        "--num-workers",
        type=_non_negative_int,
        help="DataLoader workers (default: 0 on CPU, 4 on CUDA; seeded, results do not depend on it)",
    )
    group.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: 1 for MNIST-1D, whose tiny models gain nothing from more and "
        "stall when the cores are shared; torch's default otherwise)",
    )
    group.add_argument("--out", type=Path, help="output folder")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the runs found in --out and train them anew (default: finished runs with the same "
        "settings are reused, interrupted ones resumed, ones with other settings refused)",
    )
    group.add_argument("--tensorboard", action="store_true", help="also log to <run>/tensorboard")
    group.add_argument(
        "--tasks",
        choices=TASK_SCOPES,
        default="local",
        help="under torchrun: MLTP's two tasks are each process's halves of its batch (local, default) or "
        "the unions of all processes' halves (global); see docs/distributed.md",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
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
        "--limit-train-batches",
        type=_positive_int,
        metavar="N",
        help="train on at most N batches per epoch (smoke tests)",
    )
    group.add_argument(
        "--limit-test-batches", type=_positive_int, metavar="N", help="evaluate on at most N test batches"
    )
    group.add_argument(
        "--cosine-every",
        type=_non_negative_int,
        default=DEFAULT_COSINE_EVERY,
        metavar="K",
        help="measure the cosine between the two half batches' gradients before every K-th training step "
        f"(logged per epoch as grad_cosine; it does not change the training; 0: never; default "
        f"{DEFAULT_COSINE_EVERY})",
    )


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", choices=DATASET_NAMES, default=DEFAULT_DATASET, help=f"default: {DEFAULT_DATASET}"
    )
    parser.add_argument(
        "--model",
        choices=MODEL_NAMES,
        help="default per data set: " + ", ".join(f"{d}: {m}" for d, m in DEFAULT_MODELS.items()),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-mltp",
        description="Meta-learning based training procedure (MLTP, Deng & Zhang): the paper's experiments.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,compare,reproduce}")

    train = commands.add_parser("train", help="one run: data set, model, procedure, seed")
    _add_experiment_options(train)
    train.add_argument("--procedure", choices=PROCEDURES, default="mltp", help="default: mltp")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (fail if there is none); "
        "re-running the same command resumes too",
    )
    _add_recipe_options(train)
    _add_run_options(train)

    compare = commands.add_parser(
        "compare",
        help="procedures x seeds on one data set and model: table, results.json, figures",
        description="Without arguments: MNIST-1D, all five procedures, seeds 0 1 2 (a few minutes on a CPU).",
    )
    _add_experiment_options(compare)
    compare.add_argument(
        "--procedures",
        nargs="+",
        choices=PROCEDURES,
        default=list(PROCEDURES),
        metavar="PROCEDURE",
        help=f"default: all of {', '.join(PROCEDURES)}",
    )
    compare.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="default: 0 1 2")
    compare.add_argument(
        "--baseline-dir",
        type=Path,
        metavar="DIR",
        help="keep the standard runs in DIR instead of --out, shared with other comparisons that differ "
        "only in MLTP settings (--eta, --alpha-*): finished ones are reused, missing ones trained there",
    )
    _add_recipe_options(compare)
    _add_run_options(compare)

    reproduce = commands.add_parser(
        "reproduce",
        help="one of the paper's tables with its settings",
        description="Runs the paper's grid for Table I (CIFAR-10), II (CIFAR-100) or III (Tiny ImageNet).",
    )
    reproduce.add_argument("table", choices=sorted(TABLES))
    reproduce.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="default: 0 1 2")
    reproduce.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate only")
    reproduce.add_argument(
        "--timing-steps",
        type=_non_negative_int,
        default=1,
        help="steps timed per setting for the estimate, after one warm-up step (0: no estimate; default 1)",
    )
    _add_recipe_options(reproduce)
    _add_run_options(reproduce)
    return parser


def _recipe_overrides(args: argparse.Namespace) -> dict:
    overrides = {
        name: getattr(args, name)
        for name in (
            "epochs",
            "batch_size",
            "optimizer",
            "lr",
            "lr_decay",
            "momentum",
            "weight_decay",
            "alpha_mean",
            "alpha_std",
            "eta",
            "train_samples",
            "alpha_policy",
            "alpha_lr",
        )
    }
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
        tasks=args.tasks,
        cosine_every=args.cosine_every,
    )


def _experiment(args: argparse.Namespace) -> Experiment:
    model = args.model or DEFAULT_MODELS[args.dataset]
    recipe = recipe_for(args.dataset, model).replace(**_recipe_overrides(args))
    return Experiment(args.dataset, model, recipe, args.limit_train_batches, args.limit_test_batches)


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        experiment = _experiment(args)
        run_dir = args.out or Path("runs") / f"{experiment.dataset}-{experiment.model}" / run_dir_name(
            args.procedure, args.seed
        )
        result = train_run(
            experiment, args.procedure, args.seed, run_dir, _run_options(args, log_epochs=True)
        )
        print(f"final test accuracy {result.final['test_acc']:.2f}%; results in {result.run_dir}")
    elif args.command == "compare":
        experiment = _experiment(args)
        root = args.out or Path("runs") / f"{experiment.dataset}-{experiment.model}"
        result = compare(
            experiment,
            args.procedures,
            args.seeds,
            root,
            _run_options(args, log_epochs=False),
            baseline_root=args.baseline_dir,
        )
        if not distributed.current().is_main:
            return  # under torchrun, the main process writes the outputs
        written = write_outputs(root, [result])
        print()
        print((root / "table.md").read_text())
        print("written: " + ", ".join(str(path) for path in written))
    else:
        rows = table_rows(
            args.table, _recipe_overrides(args), args.limit_train_batches, args.limit_test_batches
        )
        root = args.out or Path("runs") / args.table
        results = reproduce(
            args.table,
            rows,
            args.seeds,
            root,
            _run_options(args, log_epochs=False),
            args.timing_steps,
            args.dry_run,
        )
        if results is not None:
            print()
            print((root / "table.md").read_text())
            print(f"written: {root}/table.md, {root}/results.json and one folder per model with figures")


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
    """The handler :func:`messages_to_stdout` adds."""


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
    args = build_parser().parse_args(argv)
    threads = args.threads or (1 if getattr(args, "dataset", None) == "mnist1d" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with _processes(args), messages_to_stdout():
            _run(args)
    except (DatasetError, ExperimentError) as err:
        print(f"torch-mltp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "torch-mltp: interrupted; run the same command again to resume from the last finished epoch",
            file=sys.stderr,
        )
        return 130
    finally:
        torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
