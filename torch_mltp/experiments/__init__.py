"""The paper's experiments: recipes, the training loop, comparisons over seeds and the command line.

Needs the ``vision`` extra (torchvision, tqdm, matplotlib, mnist1d). The core package never
imports this one.
"""
