"""``MLTPOptimizer``: a thin stateful wrapper that turns any torch optimizer into MLTP (Algorithm 1).

The gradients of a step come from a backend chosen at construction (:mod:`torch_mltp.parallel`); what the
optimizer keeps between ``backward``, ``step`` and ``zero_grad`` is one :class:`StepState`.
"""

from __future__ import annotations

import contextlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import _foreach
from ._validation import (
    alpha_group_lr,
    check_base_optimizer,
    check_choice,
    check_model,
    check_real,
    check_selected_dtypes,
    check_settings,
    probe_alpha_step,
)
from .checkpoint import check_base_state, check_entry, snapshot
from .constants import ALPHA_GROUP_KEY, MLTP_STATE_KEY, TASK_SCOPES
from .functional import Closure, MLTPGradients, fast_path_applies
from .parallel import Backend, Layout, Step, backend_for
from .selection import Layer, Mode, resolve_mode, select_layers


class MLTPStepResult(NamedTuple):
    """The objective ``J`` of the last backward pass (eq. 4), its two losses, and whether it was non-finite
    and will be skipped (always ``False`` with a ``GradScaler``, which decides itself)."""

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    skipped: bool


class Stage(Enum):
    """Where an optimizer step stands, from ``zero_grad`` to ``step`` (as ``GradScaler``'s ``OptState``)."""

    READY = "ready"
    """no MLTP gradient since ``zero_grad``"""
    ACCUMULATED = "accumulated"
    """``backward`` added ``dJ/dw`` and ``dJ/dalpha`` to ``.grad``"""
    SKIP = "skip"
    """a ``backward`` was non-finite (``nonfinite="skip"``): the next ``step`` changes nothing"""
    STEPPED = "stepped"
    """the base optimizer stepped on these gradients"""


@dataclass
class StepState:
    """Everything an ``MLTPOptimizer`` carries from one call to the next: copied and pickled with it.

    ``found_inf`` is a device flag (1.0 when the accumulated gradients are not finite) that a fused base step
    reads to skip itself under ``nonfinite="skip"``, as under ``GradScaler``; ``skipped_steps`` counts the
    skipped steps, the device's part until read.
    """

    stage: Stage = Stage.READY
    found_inf: Optional[Tensor] = None
    skipped_on_host: int = 0
    skipped_on_device: Optional[Tensor] = None
    last_result: Optional[MLTPStepResult] = None
    alphas_with_gradient: set = field(default_factory=set)
    """indices of the alphas whose ``.grad`` holds a gradient"""
    warned: set = field(default_factory=set)
    """the once-only warnings already given"""

    @property
    def skipped_steps(self) -> int:
        on_device = self.skipped_on_device
        return self.skipped_on_host + (0 if on_device is None else int(on_device.item()))

    def judge(self, verdict: MLTPGradients, policy: str, on_device: bool) -> bool:
        """Record one backward pass's verdict; ``True`` when the host found it non-finite (its gradients must
        then not be accumulated).  Raises ``FloatingPointError`` under ``"raise"``."""
        grads = [g for g in (*verdict.param_grads, *(verdict.alpha_grads or ())) if g is not None]
        checked = [verdict.loss_i, verdict.loss_j, *grads]
        if on_device:
            flag = (~_foreach.all_finite(checked)).float()
            self.found_inf = flag if self.found_inf is None else torch.maximum(self.found_inf, flag)
            return False
        if _foreach.finite_on_host(checked):
            return False
        if policy == "raise":
            raise FloatingPointError(
                f"MLTP backward produced a non-finite {_first_nonfinite(verdict)}; .grad, weights, alphas "
                "and optimizer state are unchanged (pass nonfinite='skip' to skip such steps instead)"
            )
        self.stage = Stage.SKIP
        return True

    def take_skip(self) -> bool:
        """Whether the coming step is skipped on the host (and count it)."""
        skip = self.stage is Stage.SKIP
        if skip:
            self.stage = Stage.ACCUMULATED
            self.skipped_on_host += 1
        return skip

    @contextmanager
    def device_skip(self, base: Any) -> Iterator[None]:
        """Hand the device flag of the accumulated gradients to a fused base step."""
        flag = self.found_inf
        if flag is None:
            yield
            return
        base.found_inf = flag
        try:
            yield
        finally:
            del base.found_inf
            self.found_inf = None
            self.skipped_on_device = flag if self.skipped_on_device is None else self.skipped_on_device + flag


def _first_nonfinite(result: MLTPGradients) -> str:
    """The name of the first non-finite quantity of a step: ``"L_i"``, ``"L_j"``, a gradient."""
    named = [("L_i", result.loss_i), ("L_j", result.loss_j)]
    named += [(f"dJ/dw[{k}]", g) for k, g in enumerate(result.param_grads) if g is not None]
    named += [(f"dJ/dalpha[{a}]", g) for a, g in enumerate(result.alpha_grads or ()) if g is not None]
    return next(name for name, t in named if not _foreach.finite_on_host([t]))


@dataclass
class _Cache:
    """What is derived from the param groups and kept to save work: dropped on copy and pickle."""

    layout_key: Optional[tuple] = None
    layout: Optional[Layout] = None


class MLTPOptimizer(torch.optim.Optimizer):
    r"""Wrap ``base_optimizer`` so that each step minimises the MLTP objective (paper eq. 4).

    ``J = L_i(w) + eta * L_j(w - alpha * dL_i/dw)``; then ``w`` and ``alpha`` both take the base
    optimizer's step on ``dJ/dw`` and ``dJ/dalpha`` (Algorithm 1, line 7).

    MLTP changes the backward pass, not the step: :meth:`backward` accumulates ``dJ/dw`` and
    ``dJ/dalpha`` into ``.grad`` (as ``loss.backward()`` would), and :meth:`step` is the base
    optimizer's step, so clipping, accumulation, ``GradScaler`` and trainers work unchanged.
    ``step(closure_i, closure_j)`` does both at once.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` over the model's parameters.
            The tensors it holds are the ``w`` that MLTP differentiates; its param groups are
            shared with this wrapper, so LR schedulers and checkpoints work on the wrapper.
        model: the module whose layers get step sizes (used to find layers; the closures call
            it).  A ``DistributedDataParallel`` or ``torch.compile``'d model is looked through.
        eta: weight ``eta >= 0`` of the task-j loss.
        alpha_init: initial step size ``>= 0``: a float, or ``(mean, std)`` to draw each alpha
            from a normal distribution (the paper uses ``(1e-3, 1e-3)``; seed with
            ``torch.manual_seed``).  A negative value or mean is allowed with ``alpha_max <= 0``.
        mode: ``"full"`` (exact second order on all layers), ``"conv"`` / ``"fc"`` (lookahead only
            on convolution / ``nn.Linear`` layers), ``"fo"`` (all layers, first order), or a
            :class:`torch_mltp.Mode` for a custom selection.
        alpha_per: ``"layer"`` (one alpha per layer shared by its weight and bias, as in the
            paper), ``"tensor"`` (one per parameter tensor) or ``"element"`` (Meta-SGD style).
        learn_alpha: learn alpha by the base optimizer's rule; ``False`` keeps it fixed.
        alpha_lr: learning rate of the alphas' param group (default: the base optimizer's ``lr``,
            so schedulers move both together as in the paper).
        alpha_min: keep every alpha ``>= alpha_min`` (after every step, and at initialisation);
            ``None`` leaves them unconstrained as in the paper.
        alpha_max: keep every alpha ``<= alpha_max`` in the same way (``alpha_min <= alpha_max``).
            ``alpha_max=0.0`` with ``alpha_init=(-1e-3, 1e-3)`` mirrors the paper's start for
            non-positive step sizes: the lookahead ``w - alpha * dL_i/dw`` then climbs task i's loss.
        nonfinite: ``"raise"`` a ``FloatingPointError`` on a non-finite loss or gradient, or
            ``"skip"`` the step and count it in ``skipped_steps``; either way nothing changes.
            With a ``GradScaler`` the scaler handles non-finite values instead.
        tasks: with a ``DistributedDataParallel`` model (or ``process_group``): ``"local"`` (the
            default), each process's two tasks are its own and ``J`` is the mean of the processes'
            objectives; ``"global"``, task i is the union of every process's first task, task j of
            every second task.  A model sharded with FSDP (``fully_shard``) takes ``"global"`` only,
            and first-order modes.  Given with a plain model once a process group exists (``"global"``
            on any number of processes, ``"local"`` on several): an engine (the ``Trainer``, Lightning)
            wraps the model in ``DistributedDataParallel`` itself, before or after the optimizer is
            built, and the first :meth:`backward` finds the wrapper.  See ``docs/distributed.md``.
        process_group: average over this group (default: the DDP model's; none for a plain model).
        foreach: ``None`` (default) computes a step with fused multi-tensor operations wherever they
            apply, ``False`` with the plain per-tensor code of
            :func:`torch_mltp.functional.single_tensor_mltp` (same results).

    Example::

        base = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt = MLTPOptimizer(base, model, eta=1.0, alpha_init=(1e-3, 1e-3), mode="fo")
        opt.zero_grad()
        opt.backward(lambda: F.cross_entropy(model(xi), yi), lambda: F.cross_entropy(model(xj), yj))
        opt.step()
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: nn.Module,
        eta: float = 1.0,
        alpha_init: Union[float, tuple[float, float]] = (1e-3, 1e-3),
        mode: Union[str, Mode] = "full",
        *,
        alpha_per: str = "layer",
        learn_alpha: bool = True,
        alpha_lr: Optional[float] = None,
        alpha_min: Optional[float] = None,
        alpha_max: Optional[float] = None,
        nonfinite: str = "raise",
        tasks: Optional[str] = None,
        process_group: Optional[Any] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        if isinstance(base_optimizer, MLTPOptimizer):
            raise TypeError("base_optimizer is already an MLTPOptimizer; wrap the plain optimizer once")
        check_base_optimizer(base_optimizer)
        self.mode = resolve_mode(mode)
        check_model(model, self.mode)
        if tasks is not None:
            check_choice("tasks", tasks, TASK_SCOPES)
        self._backend = backend_for(model, self.mode, tasks, process_group, base_optimizer)
        bounds = (alpha_min, alpha_max)
        alpha_mean, alpha_std = check_settings(
            alpha_per, nonfinite, learn_alpha, alpha_init, alpha_lr, *bounds, foreach
        )
        self.base_optimizer, self.eta = base_optimizer, eta
        self.alpha_per, self.learn_alpha = alpha_per, learn_alpha
        self.alpha_min = None if alpha_min is None else float(alpha_min)
        self.alpha_max = None if alpha_max is None else float(alpha_max)
        self.nonfinite, self.tasks, self.foreach = nonfinite, self._backend.tasks, foreach

        layers, self._unheld_params = _held_layers(model, self.mode, base_optimizer)
        self._selected_layers = [layer.name for layer in layers]
        self._alphas, self._selected_params, self._alpha_of = _make_alphas(
            layers,
            alpha_per,
            alpha_mean,
            alpha_std,
            (self.alpha_min, self.alpha_max),
            learn_alpha,
            self._backend,
        )
        if learn_alpha:
            _add_alpha_group(base_optimizer, self._alphas, alpha_group_lr(base_optimizer, alpha_lr))
        self._state, self._cache = StepState(), _Cache()
        # Optimizer.__init__ sets up the hook machinery; the groups and the state are then the
        # base optimizer's own objects, as in timm's Lookahead and the SAM wrapper.
        super().__init__(
            [p for g in base_optimizer.param_groups for p in g["params"]], dict(base_optimizer.defaults)
        )
        self._link_base()

    # -- settings ---------------------------------------------------------------------------
    @property
    def eta(self) -> float:
        """Weight of the task-j loss in ``J`` (eq. 4)."""
        return self._eta

    @eta.setter
    def eta(self, value: float) -> None:
        check_real("eta", value, positive=False)
        self._eta = float(value)

    @property
    def first_order(self) -> bool:
        return self.mode.first_order

    @property
    def alphas(self) -> dict[str, Tensor]:
        """Each selected layer's (or tensor's) step size by name: views of the flat tensors that
        the base optimizer updates; ``.grad`` holds ``dJ/dalpha`` after :meth:`backward`."""
        return self._alphas.views

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of non-finite values (``nonfinite="skip"``)."""
        return self._state.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._state.skipped_on_host, self._state.skipped_on_device = value, None

    @property
    def last_result(self) -> Optional[MLTPStepResult]:
        """``J``, ``L_i`` and ``L_j`` of the last :meth:`backward` (detached)."""
        return self._state.last_result

    # -- the backward pass ------------------------------------------------------------------
    def backward(
        self, closure_i: Closure, closure_j: Closure, *, weight: float = 1.0, scaler: Optional[Any] = None
    ) -> Tensor:
        """Accumulate ``dJ/dw`` into the weights' ``.grad`` and ``dJ/dalpha`` into the alphas'.

        ``closure_i`` / ``closure_j`` run a forward pass on task i and task j and return the scalar
        loss without calling ``backward``.  Returns ``J`` (eq. 4) detached.  Gradients add up
        over calls, as with ``loss.backward()``; the base optimizer does not step.

        ``weight``: accumulate ``weight * dJ/dw`` and ``weight * dJ/dalpha``; to average over ``k``
        accumulated micro-batches pass ``weight=1/k``.  (Dividing the losses inside the closures
        would also shrink the inner step ``alpha * dL_i/dw``, i.e. change ``J``.)

        ``scaler``: a ``torch.amp.GradScaler``. Both losses are scaled by it before they are
        differentiated, the lookahead moves by the unscaled gradient, and ``.grad`` is left
        scaled, so ``scaler.unscale_(opt)``, clipping, ``scaler.step(opt)`` and ``scaler.update()``
        follow as in any loop.  Non-finite values are then the scaler's to handle.

        Without a scaler, a non-finite loss or gradient adds nothing to ``.grad``; with
        ``nonfinite="raise"`` it raises ``FloatingPointError``, with ``"skip"`` the next
        :meth:`step` changes nothing (and ``zero_grad`` cancels that).
        """
        _check_backward_arguments(closure_i, closure_j, weight, scaler)
        layout, state = self._layout(), self._state
        if state.stage is Stage.STEPPED and self.learn_alpha:
            self._clear_stale_alpha_gradients(layout)
        step = Step(
            closure_i,
            closure_j,
            layout,
            self._alphas.values,
            self._eta,
            self.mode.first_order,
            self.learn_alpha,
            weight,
            scaler,
            self.nonfinite == "skip",
        )
        result, verdict = self._backend.gradients(step)
        on_device = verdict is None and self.nonfinite == "skip" and self._skips_on_device(layout)
        skipped = scaler is None and state.judge(verdict or result, self.nonfinite, on_device)
        state.last_result = MLTPStepResult(result.objective, result.loss_i, result.loss_j, skipped)
        if skipped:
            return result.objective
        if state.stage is not Stage.SKIP:
            state.stage = Stage.ACCUMULATED
        _accumulate(layout.params, result.param_grads)
        if result.alpha_grads is not None:
            self._alphas.accumulate(result.alpha_grads, state.alphas_with_gradient)
        return result.objective

    def _skips_on_device(self, layout: Layout) -> bool:
        """Under ``nonfinite="skip"``, whether the base optimizer is fused and its state exists: the fused
        kernel then skips the update when told so by a device flag (as under ``GradScaler``), so no step
        waits for the device.  A step that would create state is decided on the host: a fused kernel
        told to skip may leave the state it creates unwritten (fused SGD's momentum buffers)."""
        base = self.base_optimizer
        if not getattr(base, "_step_supports_amp_scaling", False):
            return False
        stepped = layout.params + (self._alphas.buckets if self.learn_alpha else [])
        return all(p in base.state for p in stepped)

    def _clear_stale_alpha_gradients(self, layout: Layout) -> None:
        """``model.zero_grad()`` after a step clears the weights' gradients but not the alphas': clear
        those too, with a warning, rather than add this step's ``dJ/dalpha`` to the last one's."""
        if all(p.grad is None for p in layout.params) and any(
            b.grad is not None for b in self._alphas.buckets
        ):
            self._warn_once(
                "model.zero_grad() cleared the weights' gradients but not the alphas'; MLTPOptimizer "
                "cleared the alphas' gradients too. Call opt.zero_grad(), which clears both",
            )
            for bucket in self._alphas.buckets:
                bucket.grad = None
            self._forget_alpha_gradients()

    # -- the step -----------------------------------------------------------------------------
    def step(  # type: ignore[override]
        self,
        closure_i: Optional[Callable[[], Any]] = None,
        closure_j: Optional[Closure] = None,
        *,
        closure: Optional[Callable[[], Any]] = None,
    ) -> Any:
        """``step(closure_i, closure_j)``: :meth:`backward`, then the base step; returns ``J``.

        ``step()`` / ``step(closure)`` follow ``torch.optim``: the closure (if any) is called under
        ``torch.enable_grad()``, then the base optimizer steps on whatever ``.grad`` holds (weights
        and alphas) and the closure's value is returned.  Step pre- and post-hooks registered on
        this optimizer run around the base step, after the gradients exist; a step skipped for
        non-finite values runs neither (as a ``GradScaler`` skip), except around a ``step(closure)``
        whose closure found them (the hooks then run around the closure, as in ``torch.optim``).
        """
        if closure_j is not None:
            if closure is not None or not callable(closure_i) or not callable(closure_j):
                raise TypeError(
                    "step() takes either two callables, closure_i and closure_j, or one torch.optim closure"
                )
            objective = self.backward(closure_i, closure_j)
            if not self._state.take_skip():
                self._hooked_step()
            return objective
        if closure is not None and closure_i is not None:
            raise TypeError("step() got a closure twice")
        closure = closure if closure is not None else closure_i
        if closure is not None and not callable(closure):
            raise TypeError(f"step()'s closure must be callable, got {type(closure).__name__}")
        if closure is None and self._state.take_skip():
            return None
        return self._hooked_step(closure)

    step.hooked = True  # type: ignore[attr-defined]  # hooks run around the base step (_hooked_step)

    @torch.optim.Optimizer.profile_hook_step
    def _hooked_step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss, state = None, self._state
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if state.take_skip():
                return loss
        if state.stage is Stage.READY:
            self._warn_if_not_mltp_gradients()
        resting = [a for a in range(len(self._alphas.spans)) if a not in state.alphas_with_gradient]
        with contextlib.ExitStack() as context:
            if self.learn_alpha and resting:  # frozen layers' alphas are held where they are
                context.enter_context(self._alphas.hold(resting, self.base_optimizer.state))
            if state.found_inf is not None:  # a fused base step skips itself on the device
                context.enter_context(state.device_skip(self.base_optimizer))
            self.base_optimizer.step()
        if (self.alpha_min is not None or self.alpha_max is not None) and self.learn_alpha:
            self._alphas.clamp(self.alpha_min, self.alpha_max)
        state.stage = Stage.STEPPED
        return loss

    def _warn_if_not_mltp_gradients(self) -> None:
        """A plain ``loss.backward(); opt.step()`` trains as the base optimizer alone: say so once."""
        if "plain backward" in self._state.warned:
            return
        if any(
            p.grad is not None for g in self.param_groups if not g.get(ALPHA_GROUP_KEY) for p in g["params"]
        ):
            self._warn_once(
                "step() found gradients that MLTPOptimizer.backward() did not compute: a plain "
                "loss.backward() trains as the base optimizer alone and the alphas never move. Use "
                "opt.backward(closure_i, closure_j) (or opt.step(closure_i, closure_j)) in its place",
                key="plain backward",
            )

    def _warn_once(self, message: str, key: Optional[str] = None) -> None:
        key = key or message
        if key not in self._state.warned:
            self._state.warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the weights and of the alphas (and a pending skipped step)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        self._state.stage, self._state.found_inf = Stage.READY, None
        self._forget_alpha_gradients()

    def _forget_alpha_gradients(self) -> None:
        """No alpha has a gradient any more: their views' ``.grad`` is ``None``."""
        self._state.alphas_with_gradient.clear()
        self._alphas.publish_gradients(self._state.alphas_with_gradient)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; it is trained, not shifted, and the alphas' group stays last."""
        if self.param_groups is not self.base_optimizer.param_groups:
            super().add_param_group(param_group)  # from Optimizer.__init__, before the groups are linked
            return
        self.base_optimizer.add_param_group(param_group)
        self._keep_alpha_group_last()

    def _keep_alpha_group_last(self) -> None:
        groups = self.param_groups
        at = next((k for k, g in enumerate(groups) if g.get(ALPHA_GROUP_KEY)), None)
        if at is not None and at != len(groups) - 1:
            groups.append(groups.pop(at))

    # -- the step's tensors -----------------------------------------------------------------------
    def _layout(self) -> Layout:
        """Derived when the weight groups or their tensors' ``requires_grad`` change, so that added
        groups and (un)freezing are honoured."""
        held = [p for g in self.param_groups if not g.get(ALPHA_GROUP_KEY) for p in g["params"]]
        key = (*map(id, held), *[p.requires_grad for p in held])
        cache = self._cache
        if cache.layout is None or cache.layout_key != key:
            self._keep_alpha_group_last()
            cache.layout, cache.layout_key = self._derive_layout([p for p in held if p.requires_grad]), key
        if not cache.layout.params:
            raise ValueError("the base optimizer holds no trainable parameter")
        return cache.layout

    def _derive_layout(self, params: list[Tensor]) -> Layout:
        index_of = {id(p): k for k, p in enumerate(params)}
        selected, alpha_of = [], []
        for param, alpha_index in zip(self._selected_params, self._alpha_of):
            if id(param) in index_of:
                selected.append(index_of[id(param)])
                alpha_of.append(alpha_index)
        if any(id(p) in index_of for p in self._unheld_params):
            self._warn_once(
                "parameters of layers that MLTP shifts were added to the optimizer after MLTPOptimizer "
                "was built; they are trained but not shifted (they have no alpha). Build the "
                "MLTPOptimizer from a base optimizer that already holds them."
            )
        dtype = _promoted_dtype(params) if params else torch.float32
        applies = fast_path_applies(params, self._alphas.values)
        if self.foreach and not applies:
            raise ValueError("foreach=True needs plain dense tensors; pass foreach=None or False")
        foreach = applies if self.foreach is None else self.foreach
        return Layout(params, selected, alpha_of, dtype, foreach, _foreach.Workspace())

    # -- checkpoints and copies ----------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        """The settings that the ``"mltp"`` entry of :meth:`state_dict` records."""
        return {
            "mode": self.mode.describe(),
            "first_order": self.mode.first_order,
            "layers": list(self._selected_layers),
            "alpha_per": self.alpha_per,
            "learn_alpha": self.learn_alpha,
            "eta": self.eta,
            "alpha_min": self.alpha_min,
            "alpha_max": self.alpha_max,
            "nonfinite": self.nonfinite,
            "skipped_steps": self.skipped_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``"mltp"`` entry with the alphas and settings.
        The state-dict hooks registered on this optimizer run as in ``torch.optim``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._keep_alpha_group_last()
        state = self.base_optimizer.state_dict()
        state[MLTP_STATE_KEY] = snapshot(self._settings(), self.alphas)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hooked = post_hook(self, state)
            state = state if hooked is None else hooked
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the base state, the alphas' values and the settings.

        Everything is checked before anything changes: a checkpoint of another configuration or of
        another model (state shaped unlike the parameters), or with missing entries, wrongly shaped or
        non-finite alphas, is refused with a ``ValueError`` and this optimizer (base state included)
        stays as it was.  A plain optimizer's state dict (no ``"mltp"`` entry, no alphas' group), to start
        MLTP from a plain run, restores the weights' optimizer state; the alphas, their group and their
        optimizer state stay as they are, and a ``UserWarning`` says so.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            state_dict = state_dict if hooked is None else dict(hooked)
        saved = state_dict.pop(MLTP_STATE_KEY, None)
        self._keep_alpha_group_last()
        if saved is None:
            state_dict = self._with_alphas(state_dict)
            warnings.warn(
                "the state dict is a plain optimizer's (it has no 'mltp' entry): the weights' optimizer "
                "state is restored, the alphas keep their values (the initial ones in a new MLTPOptimizer), "
                "their param group and their optimizer state",
                UserWarning,
                stacklevel=2,
            )
        else:
            check_entry(saved, self._settings(), self.alphas)
            check_base_state(state_dict, self.param_groups, self.learn_alpha)
        base = self.base_optimizer
        previous = (base.state, base.param_groups)
        try:
            base.load_state_dict(state_dict)
        except Exception:
            base.state, base.param_groups = previous
            raise
        finally:
            self._link_base()
        if saved is not None:
            with torch.no_grad():
                for name, alpha in self.alphas.items():
                    alpha.copy_(saved["alphas"][name])
            self.eta, self.nonfinite = saved["eta"], saved["nonfinite"]
            self.alpha_min, self.alpha_max = saved.get("alpha_min"), saved.get("alpha_max")
            self.skipped_steps = saved["skipped_steps"]
        if self._state.stage is Stage.SKIP:  # the skip concerned gradients of the state before this one
            self._state.stage = Stage.ACCUMULATED
        self._state.found_inf = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _with_alphas(self, plain: dict[str, Any]) -> dict[str, Any]:
        """A plain optimizer's state dict, checked against the weights' groups, with the alphas' group and
        optimizer state as they are now appended (under indices after the state dict's own)."""
        groups: Any = plain.get("param_groups")  # a list of dicts once check_base_state has passed
        if isinstance(groups, list) and any(isinstance(g, dict) and g.get(ALPHA_GROUP_KEY) for g in groups):
            raise ValueError(
                "the state dict holds the alphas' param group but no 'mltp' entry: an MLTPOptimizer "
                "state dict that lost its entry cannot be loaded"
            )
        weights = self.param_groups[:-1] if self.learn_alpha else self.param_groups
        if isinstance(groups, list) and len(groups) != len(weights):
            raise ValueError(
                f"the plain optimizer's state dict has {len(groups)} param groups, this optimizer has "
                f"{len(weights)} for the weights" + (" (and the alphas' group)" if self.learn_alpha else "")
            )
        check_base_state(plain, weights, alpha_group=False)
        if not self.learn_alpha:
            return plain
        alpha_group = self.param_groups[-1]
        first = 1 + max((index for g in groups for index in g["params"]), default=-1)
        indices = list(range(first, first + len(alpha_group["params"])))
        state = dict(plain["state"])
        state.update({i: self.state[b] for i, b in zip(indices, alpha_group["params"]) if b in self.state})
        saved_alpha_group = {**alpha_group, "params": indices}
        return {**plain, "state": state, "param_groups": [*groups, saved_alpha_group]}

    def _link_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    def __getstate__(self) -> dict[str, Any]:
        """Everything but hooks (as ``torch.optim.Optimizer``) and the cache, so that
        ``copy.deepcopy((model, opt))``, pickle and ``torch.save(opt)`` give a working copy."""
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_hooks") and k != "_cache"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("alpha_max", None)  # pickled before alpha_max existed
        self._cache = _Cache()
        self._link_base()

    def __repr__(self) -> str:
        layers = list(self.alphas)
        shown = ", ".join(layers[:4]) + (f", ... ({len(layers)} total)" if len(layers) > 4 else "")
        return (
            f"MLTPOptimizer(mode={self.mode.describe()}, eta={self._eta}, alpha_per={self.alpha_per}, "
            f"learn_alpha={self.learn_alpha}, alphas=[{shown}],\n  base={self.base_optimizer!r})"
        )


def task_closures(loss_fn: Callable[..., Tensor], *batch: Any) -> tuple[Closure, Closure]:
    """Split one batch into the two tasks of the paper's protocol and return their closures.

    Every tensor in ``batch`` is split in two halves along dim 0 (a batch of 128 becomes two
    tasks of 64; an odd batch gives task i the extra sample, as ``Tensor.chunk(2)``: 33 becomes
    17 and 16); anything else is passed to both.  ``loss_fn(*task_batch)`` must return the
    scalar loss of that task.
    """
    sizes = {x.shape[0] for x in batch if isinstance(x, Tensor) and x.dim() > 0}
    if not sizes:
        raise ValueError("task_closures needs at least one batched tensor to split into two tasks")
    if len(sizes) > 1:
        raise ValueError(
            f"every tensor in the batch must have the same size along dim 0, got {sorted(sizes)}"
        )
    if min(sizes) < 2:
        raise ValueError(
            f"a batch of {min(sizes)} sample cannot be split into two tasks; a data set whose size leaves a "
            "last batch of one sample needs DataLoader(..., drop_last=True)"
        )
    halves = [x.chunk(2) if isinstance(x, Tensor) and x.dim() > 0 else (x, x) for x in batch]
    return partial(loss_fn, *(h[0] for h in halves)), partial(loss_fn, *(h[1] for h in halves))


def _held_layers(
    model: nn.Module, mode: Mode, base: torch.optim.Optimizer
) -> tuple[list[Layer], list[Tensor]]:
    """The selected layers, with only the tensors ``base`` holds, and the selected tensors it does not."""
    held = {id(p) for g in base.param_groups for p in g["params"]}
    if not any(id(p) in held for p in model.parameters()):
        raise ValueError(
            "base_optimizer holds none of the model's parameters; build it from model.parameters()"
        )
    layers = select_layers(model, mode, include=lambda p: id(p) in held)
    check_selected_dtypes(layers)
    everything = select_layers(model, mode, include=lambda p: True)
    return layers, [p for layer in everything for p in layer.params if id(p) not in held]


def _make_alphas(
    layers: list[Layer],
    alpha_per: str,
    mean: float,
    std: float,
    bounds: tuple[Optional[float], Optional[float]],
    learn: bool,
    backend: Backend,
) -> tuple[Any, list[Tensor], list[int]]:
    """One alpha per layer, tensor or element, drawn in order; each selected tensor and its alpha's index."""
    names, shapes, likes, selected, alpha_of = [], [], [], [], []
    for layer in layers:
        for n, (param_name, param) in enumerate(zip(layer.param_names, layer.params)):
            if alpha_per != "layer" or n == 0:
                names.append(layer.name if alpha_per == "layer" else param_name)
                shapes.append(param.shape if alpha_per == "element" else torch.Size())
                likes.append(param)
            selected.append(param)
            alpha_of.append(len(names) - 1)
    return backend.make_alphas(names, shapes, likes, mean, std, *bounds, learn), selected, alpha_of


def _add_alpha_group(base: torch.optim.Optimizer, alphas: Any, lr: Any) -> None:
    """The alphas' param group, last: the base ``lr`` (or ``alpha_lr``), no weight decay, and
    ``param_names`` (:func:`_bucket_names`) when the base optimizer was built on ``named_parameters()``."""
    group: dict[str, Any] = {"params": list(alphas.buckets), ALPHA_GROUP_KEY: True, "lr": lr}
    if "weight_decay" in base.defaults:
        group["weight_decay"] = 0.0
    if "param_names" in base.param_groups[0]:
        group["param_names"] = _bucket_names(alphas)
    base.add_param_group(group)
    probe_alpha_step(base, alphas.buckets)


def _bucket_names(alphas: Any) -> list[str]:
    """One name per tensor of the alphas' group, from the names of ``opt.alphas`` it holds:
    ``"mltp_alpha.<name>"`` for a tensor that holds one alpha, ``"mltp_alpha.<first>..<last>"`` for one
    that holds several (one per device and dtype), e.g. ``"mltp_alpha.0..6"``."""
    held: list[list[str]] = [[] for _ in alphas.buckets]
    for name, span in zip(alphas.names, alphas.spans):
        held[getattr(span, "bucket", span)].append(name)  # a sharded alpha is its own bucket
    return [f"{ALPHA_GROUP_KEY}.{names[0]}" + (f"..{names[-1]}" if len(names) > 1 else "") for names in held]


def _promoted_dtype(params: list[Tensor]) -> torch.dtype:
    """The widest real dtype of ``params`` (a complex tensor counts as its parts)."""
    dtype = params[0].real.dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.real.dtype)
    return dtype


def _accumulate(tensors: list[Tensor], grads: list[Optional[Tensor]]) -> None:
    """``tensor.grad += grad`` as autograd accumulates (a missing ``.grad`` takes the tensor)."""
    existing, added = [], []
    for tensor, grad in zip(tensors, grads):
        if grad is None:
            continue
        if tensor.grad is None:
            tensor.grad = grad
        else:
            existing.append(tensor.grad)
            added.append(grad)
    if existing:
        torch._foreach_add_(existing, added)


def _check_backward_arguments(closure_i: Any, closure_j: Any, weight: Any, scaler: Any) -> None:
    if not (callable(closure_i) and callable(closure_j)):
        raise TypeError(
            "backward() takes two callables, closure_i and closure_j, each returning a scalar loss"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "MLTPOptimizer cannot differentiate under torch.inference_mode(): call backward() and "
            "step() outside that context"
        )
    if scaler is not None and not callable(getattr(scaler, "scale", None)):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if weight != 1.0:
        check_real("weight", weight, positive=True)
