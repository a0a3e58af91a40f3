"""The confirmatory MNIST-1D study, pre-registered in docs/results.md ("Confirmatory study
(pre-registered)"): does MLTP beat standard training, and SAM, at a converged budget and at equal cost?

``python -m torch_mltp.experiments.confirm PHASE`` runs one phase; each reads what the phases before it
wrote under ``--results-root`` (default ``docs/results/confirm``) and ends with its summary there:
``budget`` (standard training at 0.5-4 times the recipe's epochs and with the MNIST-1D authors' recipe,
on the tuning seeds and a validation split: ``budget.md``, ``budget.png``, ``choices.json``), ``cost``
(seconds per step of each procedure, measured alone: ``cost.json``), ``rho`` (SAM's radius at equal cost
to ``mltp_fo``), ``run`` (the confirmatory runs on seeds 100-129 and their analysis: ``<model>.md``,
``results.json``, ``cost.png``; a family is analysed as soon as its runs are done) and ``report`` (the
analysis again, without training); ``all`` runs them in order, ``list`` prints a phase's commands.

Runs go to ``--runs-root`` (default ``runs/confirm``) and are reused or resumed when a phase runs again.
Processes started with the same command share a phase (each claims a comparison before running it);
``--shard K/N`` runs every N-th comparison from the K-th, to split a phase between machines. Options the
driver does not know are options of ``torch-mltp compare`` for every comparison: with ``--epochs 1
--limit-train-batches 1 --tuning-seeds 0 --confirm-seeds 100`` that is the test suite's smoke test.

The modules: ``design`` (models, regimes, budgets, seeds, the comparisons of each phase, the hypotheses),
``analysis`` (the choices, the families' tests, Holm, verdicts), ``report`` (the tables) and ``driver``
(the phases and the command line).
"""
