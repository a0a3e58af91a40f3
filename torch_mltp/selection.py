"""Which layers take the MLTP lookahead, and whether their Hessian term is kept.

A *layer* is a module that owns trainable parameters directly (paper, eq. 1: ``w = [w_1, ..., w_n]``
with ``w_l`` all the parameters of the l-th layer).  Each selected layer gets the inner step
``w_l' = w_l - alpha_l * dL_i/dw_l`` (eq. 3); the others stay at ``w``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Optional, Union, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FC_TYPES = (nn.Linear,)

LayerPredicate = Callable[[str, nn.Module], bool]
LayerSpec = Union[None, str, type, tuple, list, LayerPredicate]


@dataclass(frozen=True)
class Layer:
    """A module that owns trainable parameters: its qualified name and those parameters."""

    name: str
    module: nn.Module
    param_names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Mode:
    """An MLTP variant: which layers are shifted (``layers``) and whether ``dw'/dw`` is kept exact.

    ``layers`` selects layers by module type (a class or tuple of classes), by qualified name
    (a string or list of strings, shell-style wildcards allowed: ``"features.*"``), or by a
    predicate ``f(name, module) -> bool``; ``None`` selects every layer.
    ``first_order=True`` takes ``dw'/dw`` as the identity (MLTP_FO, paper III-E); the gradient
    with respect to alpha stays exact either way.

    The paper's variants are the strings ``"full"``, ``"conv"``, ``"fc"`` and ``"fo"``, e.g.
    "only the first conv layer" is ``Mode(layers="features.0")``.
    """

    layers: LayerSpec = None
    first_order: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.first_order, bool):
            raise TypeError(f"Mode.first_order must be a bool, got {type(self.first_order).__name__}")
        _layer_matcher(self.layers)  # validates the spec eagerly

    def describe(self) -> str:
        """A short human-readable description, stable enough to store in checkpoints."""
        for name, mode in PAPER_MODES.items():
            if mode == self:
                return name
        return f"Mode(layers={_spec_repr(self.layers)}, first_order={self.first_order})"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def model_layers(model: nn.Module, include: Optional[Callable[[torch.Tensor], bool]] = None) -> list[Layer]:
    """Every module of ``model`` that directly owns parameters, in registration order.

    ``include(param)`` decides which parameters count (default: those that require grad).
    A parameter shared by several modules (tied weights) belongs to the first module that owns
    it.  A parametrized module (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``,
    ``orthogonal``, ...) owns the tensors its parametrizations are computed from, so it is one
    layer.  Wrappers (DDP, ``torch.compile``) are looked through and their ``_orig_mod.`` name
    segments dropped, so names match the plain model's.
    """
    include = include or (lambda param: param.requires_grad)
    seen: set[int] = set()
    inside_parametrizations: set[int] = set()
    layers = []
    for module_name, module in unwrap_model(model).named_modules():
        if id(module) in inside_parametrizations:
            continue
        owned = list(module.named_parameters(recurse=False))
        if parametrize.is_parametrized(module):
            inside_parametrizations.update(id(m) for m in module.parametrizations.modules())
            owned += [(f"parametrizations.{n}", p) for n, p in module.parametrizations.named_parameters()]
        names, params = [], []
        for param_name, param in owned:
            if include(param) and id(param) not in seen:
                seen.add(id(param))
                names.append(_plain_name(f"{module_name}.{param_name}" if module_name else param_name))
                params.append(param)
        if params:
            layers.append(Layer(_plain_name(module_name), module, tuple(names), tuple(params)))
    return layers


def _plain_name(name: str) -> str:
    """A qualified name without ``torch.compile``'s ``_orig_mod`` segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def select_layers(
    model: nn.Module, mode: str | Mode, include: Optional[Callable[[torch.Tensor], bool]] = None
) -> list[Layer]:
    """The layers of ``model`` that ``mode`` shifts; raises ``ValueError`` when none matches."""
    mode = resolve_mode(mode)
    matches = _layer_matcher(mode.layers)
    layers = model_layers(model, include)
    selected = [layer for layer in layers if matches(layer.name, layer.module)]
    if not selected:
        available = ", ".join(f"{layer.name or '<root>'} ({type(layer.module).__name__})" for layer in layers)
        raise ValueError(
            f"mode {mode.describe()} selects no layer of {type(unwrap_model(model)).__name__}; "
            f"layers with trainable parameters: {available or 'none'}"
        )
    return selected


def _layer_matcher(spec: LayerSpec) -> LayerPredicate:
    if spec is None:
        return lambda name, module: True
    if isinstance(spec, type):
        spec = (spec,)
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, (tuple, list)) and spec and all(isinstance(s, type) for s in spec):
        types = tuple(spec)
        return lambda name, module: isinstance(module, types)
    if isinstance(spec, (tuple, list)) and spec and all(isinstance(s, str) for s in spec):
        patterns = tuple(spec)
        return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    if callable(spec) and not isinstance(spec, (tuple, list)):
        return spec
    raise TypeError(
        "Mode.layers must be None, a module type or tuple of types, a qualified name or list of names, "
        f"or a predicate f(name, module) -> bool; got {spec!r}"
    )


def _spec_repr(spec: LayerSpec) -> str:
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, (tuple, list)):
        return "[" + ", ".join(s.__name__ if isinstance(s, type) else repr(s) for s in spec) + "]"
    if callable(spec):
        return getattr(spec, "__qualname__", repr(spec))
    return repr(spec)


PAPER_MODES = {
    "full": Mode(),
    "conv": Mode(layers=CONV_TYPES),
    "fc": Mode(layers=FC_TYPES),
    "fo": Mode(first_order=True),
}


def resolve_mode(mode: str | Mode) -> Mode:
    """Turn ``"full" | "conv" | "fc" | "fo"`` or a :class:`Mode` into a :class:`Mode`."""
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, str):
        try:
            return PAPER_MODES[mode]
        except KeyError:
            raise ValueError(
                f"unknown mode {mode!r}: expected one of {sorted(PAPER_MODES)} or a torch_mltp.Mode"
            ) from None
    raise TypeError(f"mode must be a str or torch_mltp.Mode, got {type(mode).__name__}")
