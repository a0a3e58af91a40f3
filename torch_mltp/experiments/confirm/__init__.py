"""The confirmatory MNIST-1D study, pre-registered in docs/results.md ("Confirmatory study
(pre-registered)"): does MLTP beat standard training, and SAM, at a converged budget and at equal cost?

``python -m torch_mltp.experiments.confirm PHASE`` runs one phase; each reads what the phases before it
wrote under ``--results-root`` (default ``docs/results/confirm``) and ends with its summary there:

* ``budget``: standard training of both CNNs in both regimes at 0.5, 1, 2 and 4 times the current recipe's
  epochs and with the MNIST-1D authors' recipe, on tuning seeds 0-9, with 10% of the training samples held
  out for validation. Writes the budget curves (``budget.md``, ``budget.png``) and each regime's budget:
  the one with the highest mean validation accuracy (``choices.json``).
* ``cost``: the seconds per training step of ``standard``, ``mltp_fo``, ``mltp`` and ``sam`` at each chosen
  recipe's batch size, measured alone on the machine (``cost.json``). The ratios to standard training give
  the other procedures their equal-cost budgets (``--steps-scale``).
* ``rho``: SAM at equal cost to ``mltp_fo`` with each radius of :data:`RHO_GRID`, on the tuning seeds and
  the validation split; the radius with the highest mean validation accuracy goes to ``choices.json``.
* ``run``: the confirmatory runs on seeds 100-129 (fresh), on all training samples, and their analysis:
  the hypotheses of each family (model) with Holm-Bonferroni adjusted p-values, the secondary comparisons
  (``<model>.md``, ``results.json``) and the cost figure (``cost.png``).
* ``report``: the analysis and the figure again, from the summaries alone (no training).

A family's analysis is written as soon as all of its runs are done: its correction involves only its own
hypotheses. ``results.json`` names the families still ``pending``.

``all`` runs the phases in order. Every run goes to ``--runs-root`` (default ``runs/confirm``): running a
phase again reuses finished runs and resumes interrupted ones. Processes share a phase when they are
started with the same command: each claims a comparison before running it and skips those another one has
claimed. ``--shard K/N`` runs only every N-th comparison of a phase from the K-th (1-based), to split a
phase between machines. The summary of a phase is written by whichever process finds all its comparisons
done (or by running the phase again). ``list`` prints a phase's commands. Options the driver does not
know are options of ``torch-mltp compare`` for every comparison (``--epochs 1 --limit-train-batches 1``):
with ``--tuning-seeds 0 --confirm-seeds 100`` that is the one-seed smoke test the test suite runs.

The modules: ``design`` (models, regimes, budgets, seeds, the comparisons of each phase, the hypotheses),
``analysis`` (the choices, the families' tests, Holm, verdicts), ``report`` (the tables) and ``driver``
(the phases and the command line).
"""
