"""``MLTPOptimizer``: a thin stateful wrapper that turns any torch optimizer into MLTP (Algorithm 1)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .functional import Closure, first_nonfinite, mltp_gradients
from .selection import Mode, resolve_mode, select_layers

ALPHA_GROUP_KEY = "mltp_alpha"
ALPHA_GRANULARITIES = ("layer", "tensor", "element")
NONFINITE_POLICIES = ("raise", "skip")
_STATE_KEY = "mltp"


class MLTPStepResult(NamedTuple):
    """The objective ``J`` of the last step (eq. 4), its two losses, and whether it was skipped."""

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    skipped: bool


class MLTPOptimizer(torch.optim.Optimizer):
    r"""Wrap ``base_optimizer`` so that each ``step`` minimises the MLTP objective (paper eq. 4).

    ``J = L_i(w) + eta * L_j(w - alpha * dL_i/dw)``; then ``w`` and ``alpha`` both take the base
    optimizer's step on ``dJ/dw`` and ``dJ/dalpha`` (Algorithm 1, line 7).

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` over the model's parameters.
            Its parameters are the ``w`` that MLTP differentiates; its param groups are shared
            with this wrapper, so LR schedulers and checkpoints work on the wrapper.
        model: the module whose layers get step sizes (used to find layers, never called).
        eta: weight ``eta >= 0`` of the task-j loss.
        alpha_init: initial step size: a float, or ``(mean, std)`` to draw each alpha from a
            normal distribution (the paper uses ``(1e-3, 1e-3)``; seed with ``torch.manual_seed``).
        mode: ``"full"`` (exact second order on all layers), ``"conv"`` / ``"fc"`` (lookahead only
            on convolution / ``nn.Linear`` layers), ``"fo"`` (all layers, first order), or a
            :class:`torch_mltp.Mode` for a custom selection.
        alpha_per: ``"layer"`` (one alpha per layer shared by its weight and bias, as in the
            paper), ``"tensor"`` (one per parameter tensor) or ``"element"`` (Meta-SGD style).
        learn_alpha: learn alpha by the base optimizer's rule; ``False`` keeps it fixed.
        alpha_lr: learning rate of the alphas' param group (default: the base optimizer's ``lr``,
            so schedulers move both together as in the paper).
        nonfinite: ``"raise"`` a ``FloatingPointError`` on a non-finite loss or gradient, or
            ``"skip"`` the step and count it in ``skipped_steps``; either way nothing changes.

    Example::

        base = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt = MLTPOptimizer(base, model, eta=1.0, alpha_init=(1e-3, 1e-3), mode="fo")
        opt.zero_grad()
        J = opt.step(lambda: F.cross_entropy(model(xi), yi), lambda: F.cross_entropy(model(xj), yj))
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
        nonfinite: str = "raise",
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, MLTPOptimizer):
            raise TypeError("base_optimizer is already an MLTPOptimizer; wrap the plain optimizer once")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if any(group.get(ALPHA_GROUP_KEY) for group in base_optimizer.param_groups):
            raise ValueError("base_optimizer already holds MLTP alphas; wrap a fresh optimizer")
        _check_choice("alpha_per", alpha_per, ALPHA_GRANULARITIES)
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if not isinstance(learn_alpha, bool):
            raise TypeError(f"learn_alpha must be a bool, got {type(learn_alpha).__name__}")
        alpha_mean, alpha_std = _parse_alpha_init(alpha_init)
        if alpha_lr is not None:
            _check_real("alpha_lr", alpha_lr, positive=True)

        self.base_optimizer = base_optimizer
        self.mode = resolve_mode(mode)
        self.eta = eta
        self.alpha_per = alpha_per
        self.learn_alpha = learn_alpha
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.last_result: Optional[MLTPStepResult] = None
        self._lookahead_storage: dict[int, Tensor] = {}

        held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        layers = select_layers(model, self.mode)
        missing = [
            n for layer in layers for n, p in zip(layer.param_names, layer.params) if id(p) not in held
        ]
        if missing:
            raise ValueError(
                "base_optimizer does not hold these trainable parameters of the selected layers: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                "build it from model.parameters()"
            )

        self.alphas: dict[str, Tensor] = {}
        self._shifted_params: list[Tensor] = []
        self._alpha_of: list[int] = []
        for layer in layers:
            alpha_index = None
            for param_name, param in zip(layer.param_names, layer.params):
                if alpha_per != "layer" or alpha_index is None:
                    key = layer.name if alpha_per == "layer" else param_name
                    shape = param.shape if alpha_per == "element" else ()
                    self.alphas[key] = _draw_alpha(shape, param, alpha_mean, alpha_std, learn_alpha)
                    alpha_index = len(self.alphas) - 1
                self._shifted_params.append(param)
                self._alpha_of.append(alpha_index)
        self._alpha_list = list(self.alphas.values())

        if learn_alpha:
            alpha_group: dict[str, Any] = {"params": self._alpha_list, ALPHA_GROUP_KEY: True}
            alpha_group["lr"] = alpha_lr if alpha_lr is not None else _base_lr(base_optimizer)
            if "weight_decay" in base_optimizer.defaults:
                alpha_group["weight_decay"] = 0.0
            base_optimizer.add_param_group(alpha_group)

        # Optimizer.__init__ sets up the step/state-dict hook machinery; the groups and the state
        # are then the base optimizer's own objects, as in timm's Lookahead and the SAM wrapper.
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

    # -- the step ---------------------------------------------------------------------------
    def step(self, closure_i: Closure, closure_j: Closure) -> Tensor:  # type: ignore[override]
        """One MLTP iteration (Algorithm 1, lines 3-7); returns ``J`` detached.

        ``closure_i`` / ``closure_j`` run a forward pass on task i / task j and return the scalar
        loss without calling ``backward``.  Afterwards every parameter's ``.grad`` holds (has been
        increased by) ``dJ/dw`` and every alpha's ``.grad`` by ``dJ/dalpha``, and the base
        optimizer has stepped.  On a non-finite loss or gradient nothing is changed.
        """
        if not (callable(closure_i) and callable(closure_j)):
            raise TypeError(
                "step() takes two callables, closure_i and closure_j, each returning a scalar loss"
            )
        params, shifted, alpha_of = self._layout()
        result = mltp_gradients(
            closure_i,
            closure_j,
            params,
            shifted,
            self._alpha_list,
            alpha_of,
            self._eta,
            self.mode.first_order,
            alpha_grads=self.learn_alpha,
            lookahead_out=self._lookahead_buffers([params[k] for k in shifted]),
        )
        bad = first_nonfinite(result)
        self.last_result = MLTPStepResult(result.objective, result.loss_i, result.loss_j, bad is not None)
        if bad is not None:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"MLTP step produced a non-finite {bad}; weights, alphas and optimizer state are "
                    "unchanged (pass nonfinite='skip' to skip such steps instead)"
                )
            self.skipped_steps += 1
            return result.objective
        targets = params + (self._alpha_list if self.learn_alpha else [])
        grads = result.param_grads + (result.alpha_grads or [])
        for tensor, grad in zip(targets, grads):
            if grad is None:
                continue
            if tensor.grad is None:
                tensor.grad = grad
            else:
                tensor.grad.add_(grad)
        self.base_optimizer.step()
        return result.objective

    def _layout(self) -> tuple[list[Tensor], list[int], list[int]]:
        """This step's ``w`` (trainable tensors of the weight groups), the selection's indices in it,
        and the alpha of each; derived per step so that added groups and (un)freezing are honoured."""
        params = [
            p for g in self.param_groups if not g.get(ALPHA_GROUP_KEY) for p in g["params"] if p.requires_grad
        ]
        index_of = {id(p): k for k, p in enumerate(params)}
        shifted, alpha_of = [], []
        for param, alpha_index in zip(self._shifted_params, self._alpha_of):
            if id(param) in index_of:
                shifted.append(index_of[id(param)])
                alpha_of.append(alpha_index)
        return params, shifted, alpha_of

    def _lookahead_buffers(self, shifted_params: list[Tensor]) -> Optional[list[Tensor]]:
        """Storage for ``w'`` kept between first-order steps, so no step allocates (and, on the CPU,
        page-faults) a parameter-sized block.  ``w'`` is alive at a first-order step's peak anyway;
        a second-order step's peak comes after ``w'`` is freed, so it allocates ``w'`` per step."""
        if not self.mode.first_order:
            return None
        kept, buffers = self._lookahead_storage, {}
        for p in shifted_params:
            buffer = kept.get(id(p))
            if (
                buffer is None
                or buffer.shape != p.shape
                or buffer.dtype != p.dtype
                or buffer.device != p.device
            ):
                buffer = torch.empty_like(p, requires_grad=False)
            buffers[id(p)] = buffer
        self._lookahead_storage = buffers
        return list(buffers.values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the weights and of the alphas."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``"mltp"`` entry with the alphas and settings."""
        state = self.base_optimizer.state_dict()
        state[_STATE_KEY] = {
            "mode": self.mode.describe(),
            "alpha_per": self.alpha_per,
            "learn_alpha": self.learn_alpha,
            "eta": self._eta,
            "nonfinite": self.nonfinite,
            "skipped_steps": self.skipped_steps,
            "alphas": {name: alpha.detach().clone() for name, alpha in self.alphas.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the base state, the alphas' values and the settings."""
        state_dict = dict(state_dict)
        try:
            saved = state_dict.pop(_STATE_KEY)
        except KeyError:
            raise ValueError("not an MLTPOptimizer state dict: it has no 'mltp' entry") from None
        for key in ("mode", "alpha_per", "learn_alpha"):
            current = self.mode.describe() if key == "mode" else getattr(self, key)
            if saved[key] != current:
                raise ValueError(
                    f"state dict was saved with {key}={saved[key]!r}, this optimizer has {current!r}"
                )
        if list(saved["alphas"]) != list(self.alphas):
            raise ValueError(
                f"state dict holds alphas for layers {list(saved['alphas'])}, "
                f"this optimizer has {list(self.alphas)}"
            )
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()
        with torch.no_grad():
            for name, alpha in self.alphas.items():
                alpha.copy_(saved["alphas"][name])
        self.eta = saved["eta"]
        self.nonfinite = saved["nonfinite"]
        self.skipped_steps = saved["skipped_steps"]

    def _link_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

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
        raise ValueError("a batch must hold at least 2 samples to be split into two tasks")
    halves = [x.chunk(2) if isinstance(x, Tensor) and x.dim() > 0 else (x, x) for x in batch]
    task_i = [h[0] for h in halves]
    task_j = [h[1] for h in halves]
    return (lambda: loss_fn(*task_i)), (lambda: loss_fn(*task_j))


def _draw_alpha(shape: torch.Size, like: Tensor, mean: float, std: float, learn: bool) -> Tensor:
    alpha = torch.empty(shape, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        alpha.normal_(mean, std) if std > 0 else alpha.fill_(mean)
    return alpha.requires_grad_(learn)


def _parse_alpha_init(alpha_init: Any) -> tuple[float, float]:
    if isinstance(alpha_init, (tuple, list)):
        if len(alpha_init) != 2:
            raise ValueError(f"alpha_init as a sequence must be (mean, std), got {alpha_init!r}")
        mean, std = alpha_init
        _check_real("alpha_init mean", mean, positive=False, allow_negative=True)
        _check_real("alpha_init std", std, positive=False)
        return float(mean), float(std)
    _check_real("alpha_init", alpha_init, positive=False, allow_negative=True)
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
