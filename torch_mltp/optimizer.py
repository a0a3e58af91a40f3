"""``MLTPOptimizer``: a thin stateful wrapper that turns any torch optimizer into MLTP (Algorithm 1)."""

from __future__ import annotations

import math
import numbers
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .alphas import AlphaStore
from .checkpoint import ALPHA_GROUP_KEY, MLTP_STATE_KEY, NONFINITE_POLICIES, restore, snapshot
from .distributed import GradientAverager, broadcast_from_first_rank, process_group_of
from .functional import (
    Closure,
    MLTPGradients,
    Workspace,
    _mltp_gradients,
    alpha_segment_lengths,
    first_nonfinite,
    nonfinite_flag,
)
from .selection import Mode, resolve_mode, select_layers, unwrap_model

ALPHA_GRANULARITIES = ("layer", "tensor", "element")
TASK_SCOPES = ("local", "global")


class MLTPStepResult(NamedTuple):
    """The objective ``J`` of the last backward pass (eq. 4), its two losses, and whether it was
    non-finite and will be skipped (always ``False`` with a ``GradScaler``, which decides itself)."""

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    skipped: bool


@dataclass
class _Progress:
    """What changes from step to step.  Kept in one object so that every handle on the optimizer
    (e.g. Lightning's ``LightningOptimizer``, which forwards attribute reads) updates the same one."""

    skipped_steps: int = 0
    skip_pending: bool = False
    last_result: Optional[MLTPStepResult] = None
    warned_unheld: bool = False
    alphas_with_gradient: set = field(default_factory=set)
    lookahead_storage: dict = field(default_factory=dict)
    segment_lengths: dict = field(default_factory=dict)
    layout: Optional[tuple] = None  # (what it was derived from, _Layout)
    nonfinite_on_device: Optional[Tensor] = None  # 1.0 when the accumulated gradients are not finite
    skipped_on_device: Optional[Tensor] = None


class _Layout(NamedTuple):
    """One step's ``w`` (the trainable tensors of the weight groups), the indices of the shifted
    ones in it, the alpha of each shifted one and its position among all selected tensors."""

    params: list
    shifted: list
    alpha_of: list
    positions: list
    alpha_segments: Optional[Tensor]  # entries per alpha, on the device (scalar alphas only)


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
            ``torch.manual_seed``).
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
        nonfinite: ``"raise"`` a ``FloatingPointError`` on a non-finite loss or gradient, or
            ``"skip"`` the step and count it in ``skipped_steps``; either way nothing changes.
            With a ``GradScaler`` the scaler handles non-finite values instead.
        tasks: with a ``DistributedDataParallel`` model (or ``process_group``): ``"local"``, each
            process's two tasks are its own and ``J`` is the mean of the processes' objectives;
            ``"global"``, task i is the union of every process's first task, task j of every
            second task.  See ``docs/distributed.md``.
        process_group: average over this group (default: the DDP model's; none for a plain model).

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
        nonfinite: str = "raise",
        tasks: str = "local",
        process_group: Optional[Any] = None,
    ) -> None:
        _check_base_optimizer(base_optimizer)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_choice("alpha_per", alpha_per, ALPHA_GRANULARITIES)
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        _check_choice("tasks", tasks, TASK_SCOPES)
        if not isinstance(learn_alpha, bool):
            raise TypeError(f"learn_alpha must be a bool, got {type(learn_alpha).__name__}")
        alpha_mean, alpha_std = _parse_alpha_init(alpha_init)
        if alpha_lr is not None:
            if not learn_alpha:
                raise ValueError(
                    "alpha_lr is the learning rate of learned alphas; with learn_alpha=False drop it"
                )
            _check_real("alpha_lr", alpha_lr, positive=True)
        if alpha_min is not None:
            _check_real("alpha_min", alpha_min, positive=False, allow_negative=True)
            alpha_min = float(alpha_min)
        self.mode = resolve_mode(mode)
        _check_model(model, self.mode)

        self.base_optimizer = base_optimizer
        self.eta = eta
        self.alpha_per = alpha_per
        self.learn_alpha = learn_alpha
        self.alpha_min = alpha_min
        self.nonfinite = nonfinite
        self.tasks = tasks
        self._progress = _Progress()
        self._ddp_model = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        group = process_group if process_group is not None else process_group_of(model)
        self._averager = GradientAverager(group) if group is not None else None
        if tasks == "global" and self._averager is None:
            raise ValueError(
                "tasks='global' spreads the tasks over processes: pass a DistributedDataParallel model "
                "or a process_group"
            )

        held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in model.parameters()):
            raise ValueError(
                "base_optimizer holds none of the model's parameters; build it from model.parameters()"
            )
        layers = select_layers(model, self.mode, include=lambda p: id(p) in held)
        self._unheld_params = [
            p
            for layer in select_layers(model, self.mode, include=lambda p: True)
            for p in layer.params
            if id(p) not in held
        ]
        _check_selected_dtypes(layers)

        names, shapes, likes = [], [], []
        self._shifted_params: list[Tensor] = []
        self._alpha_of: list[int] = []
        for layer in layers:
            alpha_index = None
            for param_name, param in zip(layer.param_names, layer.params):
                if alpha_per != "layer" or alpha_index is None:
                    names.append(layer.name if alpha_per == "layer" else param_name)
                    shapes.append(param.shape if alpha_per == "element" else torch.Size())
                    likes.append(param)
                    alpha_index = len(names) - 1
                self._shifted_params.append(param)
                self._alpha_of.append(alpha_index)
        self._alphas = AlphaStore(names, shapes, likes, alpha_mean, alpha_std, alpha_min, learn_alpha)
        if self._averager is not None and self._averager.world_size > 1:
            broadcast_from_first_rank(self._alphas.buckets, self._averager.process_group)

        if learn_alpha:
            alpha_group: dict[str, Any] = {"params": list(self._alphas.buckets), ALPHA_GROUP_KEY: True}
            alpha_group["lr"] = alpha_lr if alpha_lr is not None else _base_lr(base_optimizer)
            if "weight_decay" in base_optimizer.defaults:
                alpha_group["weight_decay"] = 0.0
            base_optimizer.add_param_group(alpha_group)
            _probe_alpha_step(base_optimizer, self._alphas.buckets)

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
        _check_real("eta", value, positive=False)
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
        on_device = self._progress.skipped_on_device
        return self._progress.skipped_steps + (0 if on_device is None else int(on_device.item()))

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._progress.skipped_steps = value
        self._progress.skipped_on_device = None

    @property
    def last_result(self) -> Optional[MLTPStepResult]:
        """``J``, ``L_i`` and ``L_j`` of the last :meth:`backward` (detached)."""
        return self._progress.last_result

    # -- the backward pass ------------------------------------------------------------------
    def backward(
        self, closure_i: Closure, closure_j: Closure, *, weight: float = 1.0, scaler: Optional[Any] = None
    ) -> Tensor:
        """Accumulate ``dJ/dw`` into the weights' ``.grad`` and ``dJ/dalpha`` into the alphas'.

        ``closure_i`` / ``closure_j`` run a forward pass on task i / task j and return the scalar
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
        layout = self._layout()
        if not layout.params:
            raise ValueError("the base optimizer holds no trainable parameter")
        _check_real("weight", weight, positive=True)
        loss_scale = None
        if scaler is not None:
            loss_scale = scaler.scale(torch.ones((), device=layout.params[0].device)) * weight
        elif weight != 1.0:
            loss_scale = torch.tensor(float(weight), device=layout.params[0].device)
        global_tasks = self.tasks == "global" and self._averager is not None
        with self._ddp_model.no_sync() if self._ddp_model is not None else nullcontext():
            result = _mltp_gradients(
                closure_i,
                closure_j,
                layout.params,
                layout.shifted,
                self._alphas.values,
                layout.alpha_of,
                self._eta,
                self.mode.first_order,
                alpha_grads=self.learn_alpha,
                loss_scale=loss_scale,
                average=self._averager if global_tasks else None,
                guard_lookahead=self.nonfinite == "skip",
                workspace=Workspace(self._lookahead_buffers(layout), layout.alpha_segments),
            )
        if self._averager is not None and not global_tasks:
            result = _average_local(self._averager, result, self._eta, layout.params, self._alphas.values)

        progress = self._progress
        if scaler is None and self._skips_on_device:
            flag = nonfinite_flag(result)  # judged by the fused base step, no host synchronisation
            progress.nonfinite_on_device = (
                flag
                if progress.nonfinite_on_device is None
                else (torch.maximum(progress.nonfinite_on_device, flag))
            )
            bad = None
        else:
            bad = first_nonfinite(result) if scaler is None else None
        progress.last_result = MLTPStepResult(result.objective, result.loss_i, result.loss_j, bad is not None)
        if bad is not None:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"MLTP backward produced a non-finite {bad}; .grad, weights, alphas and optimizer "
                    "state are unchanged (pass nonfinite='skip' to skip such steps instead)"
                )
            self._progress.skip_pending = True
            return result.objective
        _accumulate(layout.params, result.param_grads)
        if result.alpha_grads is not None:
            _accumulate(self._alphas.buckets, self._alphas.bucket_gradients(result.alpha_grads))
            self._progress.alphas_with_gradient.update(
                a for a, g in enumerate(result.alpha_grads) if g is not None
            )
            self._alphas.publish_gradients(self._progress.alphas_with_gradient)
        return result.objective

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
        and alphas) and the closure's value is returned.  Step pre-hooks registered on this
        optimizer run right before the base step, after the gradients exist, in both forms.
        """
        if closure_j is not None:
            if closure is not None or not callable(closure_i) or not callable(closure_j):
                raise TypeError(
                    "step() takes either two callables, closure_i and closure_j, or one torch.optim closure"
                )
            objective = self.backward(closure_i, closure_j)
            self._step_base()
            return objective
        if closure is not None and closure_i is not None:
            raise TypeError("step() got a closure twice")
        closure = closure if closure is not None else closure_i
        if closure is not None and not callable(closure):
            raise TypeError(f"step()'s closure must be callable, got {type(closure).__name__}")
        return self._step_base(closure)

    step.hooked = True  # type: ignore[attr-defined]  # hooks run around the base step (_step_base)

    @torch.optim.Optimizer.profile_hook_step
    def _step_base(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        progress = self._progress
        if progress.skip_pending:
            progress.skip_pending = False
            progress.skipped_steps += 1
            return loss
        resting = [a for a in range(len(self._alphas.spans)) if a not in progress.alphas_with_gradient]
        holding = (
            self._alphas.hold(resting, self.base_optimizer.state) if self.learn_alpha and resting else None
        )
        with holding or nullcontext(), self._device_skip():  # frozen layers' alphas must not move
            self.base_optimizer.step()
        if self.alpha_min is not None and self.learn_alpha:
            self._alphas.clamp(self.alpha_min)
        return loss

    @property
    def _skips_on_device(self) -> bool:
        """``nonfinite="skip"`` with a fused base optimizer: the fused kernel skips the update when told
        so by a device flag (as under ``GradScaler``), so no step waits for the device."""
        return self.nonfinite == "skip" and bool(
            getattr(self.base_optimizer, "_step_supports_amp_scaling", False)
        )

    @contextmanager
    def _device_skip(self) -> Iterator[None]:
        """Hand the non-finite flag of the accumulated gradients to a fused base step."""
        progress = self._progress
        flag = progress.nonfinite_on_device
        if flag is None:
            yield
            return
        self.base_optimizer.found_inf = flag
        try:
            yield
        finally:
            del self.base_optimizer.found_inf
            progress.nonfinite_on_device = None
            progress.skipped_on_device = (
                flag if progress.skipped_on_device is None else progress.skipped_on_device + flag
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the weights and of the alphas (and a pending skipped step)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        self._progress.skip_pending = False
        self._progress.nonfinite_on_device = None
        self._progress.alphas_with_gradient.clear()
        self._alphas.publish_gradients(self._progress.alphas_with_gradient)

    # -- the step's tensors -----------------------------------------------------------------------
    def _layout(self) -> _Layout:
        """Derived when the weight groups or their tensors' ``requires_grad`` change, so that added
        groups and (un)freezing are honoured."""
        held = [p for g in self.param_groups if not g.get(ALPHA_GROUP_KEY) for p in g["params"]]
        key = tuple((id(p), p.requires_grad) for p in held)
        cached = self._progress.layout
        if cached is not None and cached[0] == key:
            return cached[1]
        layout = self._derive_layout([p for p in held if p.requires_grad])
        self._progress.layout = (key, layout)
        return layout

    def _derive_layout(self, params: list[Tensor]) -> _Layout:
        index_of = {id(p): k for k, p in enumerate(params)}
        shifted, alpha_of, positions = [], [], []
        for position, (param, alpha_index) in enumerate(zip(self._shifted_params, self._alpha_of)):
            if id(param) in index_of:
                shifted.append(index_of[id(param)])
                alpha_of.append(alpha_index)
                positions.append(position)
        if self._unheld_params and not self._progress.warned_unheld:
            added = [p for p in self._unheld_params if id(p) in index_of]
            if added:
                self._progress.warned_unheld = True
                warnings.warn(
                    f"{len(added)} parameter(s) of layers that MLTP shifts were added to the optimizer "
                    "after MLTPOptimizer was built; they are trained but not shifted (they have no alpha). "
                    "Build the MLTPOptimizer from a base optimizer that already holds them.",
                    stacklevel=3,
                )
        return _Layout(params, shifted, alpha_of, positions, self._alpha_segments(params, shifted, alpha_of))

    def _alpha_segments(
        self, params: list[Tensor], shifted: list[int], alpha_of: list[int]
    ) -> Optional[Tensor]:
        """The entries per scalar alpha as a device tensor, made once per layout (no copy per step)."""
        if self.alpha_per == "element" or not shifted:
            return None
        lengths = tuple(
            alpha_segment_lengths([params[k] for k in shifted], alpha_of, len(self._alphas.spans))
        )
        cache = self._progress.segment_lengths
        if lengths not in cache:
            cache.clear()
            cache[lengths] = torch.tensor(lengths, device=params[shifted[0]].device)
        return cache[lengths]

    def _lookahead_buffers(self, layout: _Layout) -> Optional[list[Tensor]]:
        """Storage for ``w'`` kept between first-order steps, so no step allocates (and, on the CPU,
        page-faults) a parameter-sized block.  ``w'`` is alive at a first-order step's peak anyway;
        a second-order step's peak comes after ``w'`` is freed, so it allocates ``w'`` per step."""
        if not self.mode.first_order:
            return None
        kept, buffers = self._progress.lookahead_storage, {}
        for position, k in zip(layout.positions, layout.shifted):
            p = layout.params[k]
            buffer = kept.get(position)
            if (
                buffer is None
                or buffer.shape != p.shape
                or buffer.dtype != p.dtype
                or buffer.device != p.device
            ):
                buffer = torch.empty_like(p, requires_grad=False)
            buffers[position] = buffer
        self._progress.lookahead_storage = buffers
        return list(buffers.values())

    # -- checkpoints and copies ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``"mltp"`` entry with the alphas and settings."""
        state = self.base_optimizer.state_dict()
        state[MLTP_STATE_KEY] = snapshot(self)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the base state, the alphas' values and the settings.

        Everything is checked before anything changes: a checkpoint of another configuration, or
        with missing entries, wrongly shaped or non-finite alphas, is refused with a
        ``ValueError`` and this optimizer (base state included) stays as it was.
        """
        restore(self, state_dict)

    def _link_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    def __getstate__(self) -> dict[str, Any]:
        """Everything but hooks (as ``torch.optim.Optimizer``) and the lookahead scratch storage, so
        that ``copy.deepcopy((model, opt))``, pickle and ``torch.save(opt)`` give a working copy."""
        state = {key: value for key, value in self.__dict__.items() if not key.endswith("_hooks")}
        progress = self._progress
        state["_progress"] = _Progress(
            progress.skipped_steps,
            progress.skip_pending,
            progress.last_result,
            progress.warned_unheld,
            set(progress.alphas_with_gradient),
            nonfinite_on_device=progress.nonfinite_on_device,
            skipped_on_device=progress.skipped_on_device,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
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
    tasks of 64); anything else is passed to both.  ``loss_fn(*task_batch)`` must return the
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
    task_i = [h[0] for h in halves]
    task_j = [h[1] for h in halves]
    return (lambda: loss_fn(*task_i)), (lambda: loss_fn(*task_j))


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


def _average_local(
    averager: GradientAverager, result: MLTPGradients, eta: float, params: list[Tensor], alphas: list[Tensor]
) -> MLTPGradients:
    """``tasks="local"``: the mean over processes of ``J`` and of its gradients, in one pass."""
    with_alphas = result.alpha_grads is not None
    tensors = [result.loss_i, result.loss_j, *result.param_grads, *(result.alpha_grads or ())]
    like = [result.loss_i, result.loss_j, *params, *(alphas if with_alphas else ())]
    loss_i, loss_j, *grads = averager(tensors, like)
    return MLTPGradients(
        loss_i + eta * loss_j,
        loss_i,
        loss_j,
        grads[: len(params)],
        grads[len(params) :] if with_alphas else None,
    )


def _check_base_optimizer(base: Any) -> None:
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base).__name__}")
    if isinstance(base, MLTPOptimizer):
        raise TypeError("base_optimizer is already an MLTPOptimizer; wrap the plain optimizer once")
    if any(group.get(ALPHA_GROUP_KEY) for group in base.param_groups):
        raise ValueError("base_optimizer already holds MLTP alphas; wrap a fresh optimizer")
    if isinstance(base, torch.optim.LBFGS):
        raise TypeError(
            "LBFGS cannot be wrapped: its step re-evaluates a closure several times per step, while "
            "MLTP's gradients come from its own backward pass; use a first-order optimizer (SGD, Adam, ...)"
        )
    if isinstance(base, torch.optim.SparseAdam):
        raise TypeError(
            "SparseAdam takes only sparse gradients, and MLTP's gradients are dense; use Adam or AdamW"
        )


def _check_model(model: nn.Module, mode: Mode) -> None:
    """Refuse what cannot work, before the first step does."""
    plain = unwrap_model(model)
    for name, module in plain.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise ValueError(
                f"{name or 'the model'} is an embedding with sparse=True; MLTP combines dense gradients, "
                "build it with sparse=False"
            )
    if mode.first_order:
        return
    compiled = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "_orig_mod", None), nn.Module)
    ]
    if compiled:
        raise ValueError(
            f"mode {mode.describe()} differentiates the model twice, which a torch.compile'd model "
            f"({compiled[0] or 'the model'}) does not support; use mode='fo' with a compiled model, "
            "or pass the uncompiled model"
        )


def _check_selected_dtypes(layers) -> None:
    for layer in layers:
        for name, param in zip(layer.param_names, layer.params):
            if param.is_complex() or not param.is_floating_point():
                raise TypeError(
                    f"{name} is {param.dtype}: MLTP's step sizes are real and shift floating-point "
                    "tensors only; leave this layer out of the selection (Mode(layers=...))"
                )


def _probe_alpha_step(base: torch.optim.Optimizer, alphas: list[Tensor]) -> None:
    """Run one base step on the alphas alone (zero gradients, lr 0) and undo it, so that an
    optimizer that cannot update a step-size tensor fails here rather than mid-training.  A wrapper
    that shares its param groups with the optimizer it holds as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, whose step also steps and updates a ``GradScaler``) is probed through
    that optimizer."""
    inner = getattr(base, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner.param_groups is base.param_groups:
        base, inner = inner, getattr(inner, "optimizer", None)
    group = base.param_groups[-1]
    others = [p for g in base.param_groups[:-1] for p in g["params"]]
    saved_grads = [p.grad for p in others]
    saved_values = [a.detach().clone() for a in alphas]
    saved_lr = group["lr"]
    try:
        for p in others:
            p.grad = None
        for a in alphas:
            a.grad = torch.zeros_like(a)
        group["lr"] = torch.zeros_like(saved_lr) if isinstance(saved_lr, Tensor) else 0.0
        base.step()
    except Exception as err:
        base.param_groups.pop()
        raise TypeError(
            f"{type(base).__name__} cannot update MLTP's step sizes (alpha tensors shaped like "
            f"{tuple(alphas[0].shape)}): its step failed with {type(err).__name__}: {err}. Use an optimizer "
            "that takes any tensor (SGD, Adam, AdamW, ...), or learn_alpha=False"
        ) from err
    finally:
        group["lr"] = saved_lr
        for p, grad in zip(others, saved_grads):
            p.grad = grad
        with torch.no_grad():
            for a, value in zip(alphas, saved_values):
                a.grad = None
                a.copy_(value)
                base.state.pop(a, None)


def _parse_alpha_init(alpha_init: Any) -> tuple[float, float]:
    """``(mean, std)`` of the initial alphas; a negative mean is refused: a negative step size flips
    the sign of eq. 5's alignment term, so MLTP would reward disagreement between the tasks."""
    if isinstance(alpha_init, (tuple, list)):
        if len(alpha_init) != 2:
            raise ValueError(f"alpha_init as a sequence must be (mean, std), got {alpha_init!r}")
        mean, std = alpha_init
        _check_real("alpha_init mean", mean, positive=False)
        _check_real("alpha_init std", std, positive=False)
        return float(mean), float(std)
    _check_real("alpha_init", alpha_init, positive=False)
    return float(alpha_init), 0.0


def _check_real(name: str, value: Any, positive: bool, allow_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not allow_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _base_lr(optimizer: torch.optim.Optimizer) -> Any:
    lr = optimizer.defaults.get("lr", optimizer.param_groups[0].get("lr"))
    if lr is None:
        raise ValueError(
            f"{type(optimizer).__name__} has no 'lr' setting: pass alpha_lr for the alphas' group"
        )
    return lr
