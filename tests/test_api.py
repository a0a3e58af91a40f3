"""docs/api.md documents the public API as it is: every public name, nothing else, and for every callable
its signature (names, kinds, annotations, defaults) and a row per argument with the right default."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, ForwardRef, NamedTuple, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "api.md"
PACKAGES = ("torch_mltp", "torch_mltp.functional", "torch_mltp.parallel")
INTEGRATIONS = ("torch_mltp.integrations.transformers", "torch_mltp.integrations.accelerate")
HEADING = re.compile(r"^(#{2,6}) (.+?)\s*$", re.M)
ENTRY = re.compile(r"^`([\w.]+)`$")
SIGNATURE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+?) \| (.+) \|\s*$", re.M)
REQUIRED, VARIADIC = "required", "—"


class Entry(NamedTuple):
    name: str
    body: str


def entries() -> dict[str, Entry]:
    """The page's entries: a heading that is a dotted name in backticks, with its text up to the next one."""
    text = PAGE.read_text()
    headings = list(HEADING.finditer(text))
    found: dict[str, Entry] = {}
    for heading, following in zip(headings, [*headings[1:], None]):
        match = ENTRY.match(heading.group(2))
        if match:
            name = match.group(1)
            assert name not in found, f"{name} is documented twice"
            found[name] = Entry(name, text[heading.end() : following.start() if following else len(text)])
    return found


def resolve(name: str) -> Any:
    """The object a dotted name denotes: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
        return obj
    raise ImportError(name)


def resolves(name: str) -> bool:
    try:
        resolve(name)
    except (ImportError, AttributeError):
        return False
    return True


def public_names(module_name: str) -> list[str]:
    """``__all__``, or the names a module defines itself without a leading underscore."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name
        ]
    return [f"{module_name}.{name}" for name in names]


def members(class_name: str) -> list[str]:
    """The public methods and properties a class defines itself."""
    cls = resolve(class_name)
    return [
        f"{class_name}.{name}"
        for name, obj in vars(cls).items()
        if not name.startswith("_") and (inspect.isfunction(obj) or isinstance(obj, property))
    ]


def available_modules() -> list[str]:
    modules = list(PACKAGES)
    for module in INTEGRATIONS:  # each needs its engine (an extra)
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        modules.append(module)
    return modules


def expected_names() -> set[str]:
    names = {name for module in available_modules() for name in public_names(module)}
    classes = [name for name in names if inspect.isclass(resolve(name))]
    return names | {member for cls in classes for member in members(cls)}


def in_available_module(name: str) -> bool:
    needed = [module for module in INTEGRATIONS if name.startswith(f"{module}.")]
    return all(module in available_modules() for module in needed)


def documented_callables() -> list[Any]:
    return [
        pytest.param(entry, id=name)
        for name, entry in entries().items()
        if in_available_module(name)
        and resolves(name)
        and (inspect.isclass(resolve(name)) or inspect.isfunction(resolve(name)))
    ]


def signature_of(name: str) -> inspect.Signature:
    """The signature as a caller sees it: a class's constructor, a method without ``self``."""
    obj = resolve(name)
    signature = inspect.signature(obj)
    if inspect.isclass(obj):
        return signature.replace(return_annotation=inspect.Signature.empty)
    if inspect.isclass(resolve(name.rsplit(".", 1)[0])):
        return signature.replace(parameters=list(signature.parameters.values())[1:])
    return signature


def documented_signature(entry: Entry) -> ast.FunctionDef:
    blocks = SIGNATURE.findall(entry.body)
    assert blocks, f"{entry.name}: no ```python block with its signature"
    code = blocks[0].strip()
    assert code.startswith(f"{entry.name}("), (
        f"{entry.name}: the signature block must start with {entry.name}("
    )
    function = ast.parse(f"def _{code[len(entry.name) :]}: ...").body[0]
    assert isinstance(function, ast.FunctionDef)
    return function


def annotation_text(annotation: Any) -> Optional[str]:
    """An annotation as normalised source text (``None`` when absent)."""
    if annotation is inspect.Parameter.empty or annotation is inspect.Signature.empty:
        return None
    if isinstance(annotation, ForwardRef):
        annotation = annotation.__forward_arg__
    if not isinstance(annotation, str):
        return None  # an evaluated annotation: not compared
    return ast.unparse(ast.parse(annotation, mode="eval"))


def same_default(text: str, default: Any) -> bool:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text == repr(default)
    return type(value) is type(default) and value == default


def documented_parameters(function: ast.FunctionDef) -> list[tuple[str, Any, Optional[str], Optional[str]]]:
    """(name, kind, annotation, default) per parameter, in order."""
    arguments = function.args
    kind = inspect.Parameter
    positional = [(a, kind.POSITIONAL_ONLY) for a in arguments.posonlyargs]
    positional += [(a, kind.POSITIONAL_OR_KEYWORD) for a in arguments.args]
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    result = [
        (a.arg, k, a.annotation, None if d is None else ast.unparse(d))
        for (a, k), d in zip(positional, defaults)
    ]
    if arguments.vararg:
        result.append((arguments.vararg.arg, kind.VAR_POSITIONAL, arguments.vararg.annotation, None))
    for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults):
        result.append((a.arg, kind.KEYWORD_ONLY, a.annotation, None if d is None else ast.unparse(d)))
    if arguments.kwarg:
        result.append((arguments.kwarg.arg, kind.VAR_KEYWORD, arguments.kwarg.annotation, None))
    return [(n, k, None if a is None else ast.unparse(a), d) for n, k, a, d in result]


def test_every_public_name_is_documented_and_nothing_else():
    documented = {name for name in entries() if in_available_module(name)}
    expected = expected_names()
    assert not expected - documented, f"public but not in docs/api.md: {sorted(expected - documented)}"
    assert not documented - expected, f"in docs/api.md but not public: {sorted(documented - expected)}"


def test_the_integrations_are_documented_even_where_their_engine_is_missing():
    documented = set(entries())
    assert {"torch_mltp.integrations.transformers.MLTPTrainer"} <= documented
    assert {"torch_mltp.integrations.accelerate.unwrap_optimizer"} <= documented


@pytest.mark.parametrize("entry", documented_callables())
def test_the_signature_block_is_the_code_s(entry: Entry):
    signature = signature_of(entry.name)
    function = documented_signature(entry)
    documented = documented_parameters(function)
    actual = list(signature.parameters.values())
    assert [(n, k) for n, k, _, _ in documented] == [(p.name, p.kind) for p in actual], entry.name
    for (name, _, annotation, default), param in zip(documented, actual):
        assert annotation == annotation_text(param.annotation), f"{entry.name}: the annotation of {name}"
        if param.default is inspect.Parameter.empty:
            assert default is None, f"{entry.name}: {name} has no default"
        else:
            assert default is not None and same_default(default, param.default), (
                f"{entry.name}: {name}'s default"
            )
    returns = None if function.returns is None else ast.unparse(function.returns)
    assert returns == annotation_text(signature.return_annotation), f"{entry.name}: the return annotation"


@pytest.mark.parametrize("entry", documented_callables())
def test_every_argument_has_a_row_with_its_default(entry: Entry):
    parameters = list(signature_of(entry.name).parameters.values())
    rows = ROW.findall(entry.body)
    if not parameters:
        assert not rows, f"{entry.name} takes no argument"
        return
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    assert [name for name, _, _ in rows] == [stars.get(p.kind, "") + p.name for p in parameters], entry.name
    for (name, default, meaning), param in zip(rows, parameters):
        assert meaning.strip(), f"{entry.name}: {name} has no meaning"
        if param.kind in stars:
            assert default == VARIADIC, f"{entry.name}: {name}'s default column must be {VARIADIC}"
        elif param.default is inspect.Parameter.empty:
            assert default == REQUIRED, f"{entry.name}: {name} is required"
        else:
            literal = re.fullmatch(r"`(.+)`", default)
            assert literal and same_default(literal.group(1), param.default), (
                f"{entry.name}: {name}'s default"
            )


def test_properties_and_constants_have_no_signature_block():
    for name, entry in entries().items():
        if not (in_available_module(name) and resolves(name)):
            continue
        obj = resolve(name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            assert not any(block.startswith(f"{name}(") for block in SIGNATURE.findall(entry.body)), name


def test_the_page_s_links_to_its_own_headings_resolve():
    text = PAGE.read_text()

    def anchor(heading: str) -> str:  # as GitHub derives it
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    anchors = {anchor(heading) for _, heading in HEADING.findall(text)}
    missing = {target for target in re.findall(r"\]\(#([^)]+)\)", text) if target not in anchors}
    assert not missing, f"links to no heading: {sorted(missing)}"
    for document, target in re.findall(r"\]\(([\w-]+\.md)(?:#([^)]+))?\)", text):
        path = PAGE.parent / document
        assert path.exists(), document
        if target:
            assert target in {anchor(h) for _, h in HEADING.findall(path.read_text())}, f"{document}#{target}"
