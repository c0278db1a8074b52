"""THE rule registry: module types, functions, tensor methods and ATen ops -> the rule that knows them.

Lookups go through the active registry: the global one, or a scope opened with :func:`rules_scope` (or by a pruner
that carries its own ``rules=``), whose registrations shadow the global ones and vanish when it closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.rules.base import Rule


class Registry:
    """Rules by module type (subclasses inherit) and by function, method name or ATen op, with a parent to
    fall back to."""

    def __init__(self, parent: Registry | None = None):
        self.parent = parent
        self.modules: dict[type, Rule] = {}
        self.functions: dict[Any, Rule] = {}
        self.names: dict[str, Rule] = {}  # "package.module.Name" of classes/functions not imported here
        #: (predicate on a module, rule) for families of classes no name lists (transformers' ``*RMSNorm``)
        self.predicates: list[tuple[Callable[[nn.Module], bool], Rule]] = []

    def module_rule(self, module: nn.Module) -> Rule | None:
        """The rule for the module's type or its nearest registered base class (scopes first): what its size
        attributes are and how to sync them."""
        found = self.registered(module)
        return None if found is None else found[1]

    def call_rule(self, module: nn.Module) -> Rule | None:
        """The rule for a call of the module: its :meth:`module_rule`, unless its class overrides the ``forward`` of
        the class the rule was registered for (a ``Linear`` subclass that rescales its weight), whose call is then
        traced through instead of read as the base layer."""
        found = self.registered(module)
        if found is None or getattr(type(module), "forward", None) is not getattr(found[0], "forward", None):
            return None
        return found[1]

    def registered(self, module: nn.Module | type) -> tuple[type, Rule] | None:
        """The nearest class in the module's (or class's) MRO with a rule, and that rule."""
        for cls in (module if isinstance(module, type) else type(module)).__mro__:
            registry: Registry | None = self
            while registry is not None:
                if cls in registry.modules:
                    return cls, registry.modules[cls]
                rule = registry.names.get(f"{cls.__module__}.{cls.__qualname__}")
                if rule is not None:
                    return cls, rule
                registry = registry.parent
        registry = self
        while registry is not None and not isinstance(module, type):
            for predicate, rule in registry.predicates:
                if predicate(module):
                    return type(module), rule
            registry = registry.parent
        return None

    def function_rule(self, target: Any) -> Rule | None:
        """The rule for a function, a tensor method name, or an ATen overload (or its packet)."""
        keys = [target]
        packet = getattr(target, "overloadpacket", None)
        if packet is not None:
            keys.append(packet)
        name = f"{getattr(target, '__module__', None)}.{getattr(target, '__qualname__', None)}"
        registry: Registry | None = self
        while registry is not None:
            for key in keys:
                rule = registry.functions.get(key)
                if rule is not None:
                    return rule
            if name in registry.names:
                return registry.names[name]
            registry = registry.parent
        return None

    def python_functions(self) -> list[Callable]:
        """Registered plain Python functions (fx keeps them as single nodes instead of tracing into them)."""
        found, registry = [], self
        while registry is not None:
            found += [k for k in registry.functions if callable(k) and not isinstance(k, str)]
            registry = registry.parent
        return found


_GLOBAL = Registry()
_ACTIVE: ContextVar[Registry] = ContextVar("lightning_prune_rules", default=_GLOBAL)


def active() -> Registry:
    return _ACTIVE.get()


def rule_for(module: nn.Module) -> Rule | None:
    """The rule fusion uses for ``module`` (in the active scope)."""
    return active().module_rule(module)


def layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module fqn: (input width, output width)}`` for every module whose rule knows its widths (layers, per-channel
    norms; a LayerNorm's last normalised dim; an LSTM's input size and hidden size).

    Compare the result before and after ``prune()`` to see each layer's channels before -> after.
    """
    widths = {}
    for name, module in model.named_modules():
        rule = rule_for(module)
        found = rule.widths(module) if rule is not None else None
        if found is not None:
            widths[name] = found
    return widths


def sync_containers(model: nn.Module, changed: Iterable[nn.Module],
                    before: Callable[[nn.Module], None] | None = None) -> list[nn.Module]:
    """Sync every module with a container rule (``rule.transparent``) that holds a changed module, deepest first, so
    an attention block's head counts follow its narrowed projections; returns the modules synced.

    ``before(module)`` runs before each sync (fusion journals the module's attributes there).
    """
    synced = []
    for module, rule in containers_holding(model, changed):
        if before is not None:
            before(module)
        rule.sync(module)
        synced.append(module)
    return synced


def containers_holding(model: nn.Module, changed: Iterable[nn.Module]) -> Iterator[tuple[nn.Module, Any]]:
    """Each module with a container rule that holds one of ``changed``, with its rule, deepest first."""
    dirty = {id(m) for m in changed}
    for module in reversed(list(model.modules())):  # every module after all of its descendants
        if any(id(child) in dirty for child in module.children()):
            dirty.add(id(module))
        rule = active().module_rule(module)
        if id(module) in dirty and rule is not None and rule.transparent:
            yield module, rule


def register_layer(layer_type: type[nn.Module], rule: Rule | type[nn.Module]) -> None:
    """Teach fusion how ``layer_type``'s channels map and how to narrow it; subclasses inherit the rule unless they
    override ``forward`` (their calls are then traced through). ``rule`` may also be a layer type with a rule, whose
    rule ``layer_type`` then shares (``register_layer(MyScaledLinear, nn.Linear)`` for a subclass whose forward
    keeps ``nn.Linear``'s channels).

    Registers in the innermost open :func:`rules_scope`, or globally.

    Raises:
        PruningConfigError: ``layer_type`` is not an nn.Module subclass, or ``rule`` is neither a Rule nor a layer
            type that has one.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise PruningConfigError(f"register_layer expects an nn.Module subclass, got {layer_type!r}")
    if isinstance(rule, type) and issubclass(rule, nn.Module):
        found = active().registered(rule)
        if found is None:
            raise PruningConfigError(f"register_layer: {rule.__name__} has no rule to share with "
                                     f"{layer_type.__name__}; pass a Rule")
        rule = found[1]
    if not isinstance(rule, Rule):
        raise PruningConfigError(
            f"register_layer expects a Rule (LayerRule, ChannelwiseRule, ElementwiseRule, ...) or a layer type that "
            f"has one, got {rule!r}"
        )
    active().modules[layer_type] = rule


def register_function(target: Any, rule: Rule) -> None:
    """Teach fusion what a function does to channels: a Python function (fx keeps it as one node), a tensor method
    name such as ``"relu"``, or an ATen op such as ``torch.ops.aten.relu`` (export graphs).

    Raises:
        PruningConfigError: ``rule`` is not a Rule, or ``target`` is none of the above.
    """
    if not isinstance(rule, Rule):
        raise PruningConfigError(f"register_function expects a Rule (e.g. ElementwiseRule(fn)), got {rule!r}")
    if not (callable(target) or isinstance(target, str)):
        raise PruningConfigError(
            f"register_function expects a function, a tensor method name or an ATen op, got {target!r}"
        )
    active().functions[target] = rule


def register_functions(targets: list[Any], rule: Rule) -> None:
    """One rule for several spellings of the same op (``F.relu``, ``torch.relu``, ``"relu"``, ATen's relu)."""
    for target in targets:
        if target is not None:
            register_function(target, rule)


def register_by_name(qualified_name: str, rule: Rule) -> None:
    """Register a rule for a class or function by its ``module.QualName`` without importing its package (for
    optional libraries such as torchvision, timm or transformers)."""
    active().names[qualified_name] = rule


def register_predicate(predicate: Callable[[nn.Module], bool], rule: Rule) -> None:
    """Register ``rule`` for every module ``predicate(module)`` accepts whose class (and bases) have no rule of their
    own: a family of classes recognised by their form rather than listed (transformers' ``*RMSNorm`` classes)."""
    active().predicates.append((predicate, rule))


@contextlib.contextmanager
def rules_scope(rules: Mapping[Any, Rule] | None = None) -> Iterator[Registry]:
    """Registrations made inside (and ``rules``: module types or functions -> rules) apply only until it exits.

    >>> with rules_scope({MyLayer: MyRule()}):
    ...     pruner.prepare(model, config)
    """
    if rules is not None and not isinstance(rules, Mapping):
        raise PruningConfigError(f"rules must be a mapping of module types or functions to rules, got "
                                 f"{type(rules).__name__}: {rules!r}")
    scope = Registry(parent=active())
    token = _ACTIVE.set(scope)
    try:
        for key, rule in (rules or {}).items():
            if isinstance(key, type) and issubclass(key, nn.Module):
                register_layer(key, rule)
            else:
                register_function(key, rule)
        yield scope
    finally:
        _ACTIVE.reset(token)


def aten(name: str) -> Any:
    """An ATen op packet by name, or None on a torch without it."""
    return getattr(torch.ops.aten, name, None)
