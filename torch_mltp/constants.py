"""The core's named values, defined once."""

ALPHA_GRANULARITIES = ("layer", "tensor", "element")
"""``alpha_per``: one step size per layer (the paper), per parameter tensor, or per element."""

TASK_SCOPES = ("local", "global")
"""``tasks``: each process's own two tasks, or the unions of every process's task i and task j."""

NONFINITE_POLICIES = ("raise", "skip")
"""``nonfinite``: what a step with a non-finite loss or gradient does."""

ALPHA_GROUP_KEY = "mltp_alpha"
"""Marks the alphas' param group (``group["mltp_alpha"] is True``), always the last group."""

MLTP_STATE_KEY = "mltp"
"""The entry of ``MLTPOptimizer.state_dict()`` that holds the alphas and the settings."""

LARGE_TENSOR = 2**20
"""The fast path processes tensors of at least this many entries one by one, without temporaries: for
them a kernel launch costs less than an extra pass over memory.  Smaller ones are batched into a fixed
number of fused operations (``torch._foreach_*``), however many there are."""

EARLY_RELEASE_FROM = 2**16
"""Entries from which the fast second-order step hands a parameter's storage back as soon as its gradient
at ``w'`` is complete: a hook costs the host several microseconds per tensor and step, more than freeing a
smaller value a little earlier is worth."""
