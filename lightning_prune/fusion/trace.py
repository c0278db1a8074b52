"""Front ends: turn a model into one fx graph that the walk reads, with shapes when example inputs are given.

- ``torch.fx`` symbolic tracing (the seed's API: no inputs needed). Every module with a fusion rule is a leaf, so it
  appears as one ``call_module`` node; with example inputs, a run on meta-device stand-ins (fake tensors where the
  forward makes tensors of its own) gives every node its shape and dtype (``node.meta["val"]``) at no real compute
  or memory.
- ``torch.export`` (non-strict) for models fx cannot trace, such as Hugging Face transformers. Its core-ATen graph is
  rewritten into the same vocabulary: each call of a module with a rule collapses back into one ``call_module`` node
  (found from ``nn_module_stack``), lifted parameters become ``get_attr`` nodes, and the remaining ops keep their ATen
  targets, which the registry knows too.

Each node's ``meta["source"]`` names the user's line of code that made it.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.graph import Traced, module_path
from lightning_prune.fusion.rules import registry
from lightning_prune.measure import eval_mode

_OWN = (f"{os.sep}torch{os.sep}", f"{os.sep}lightning_prune{os.sep}")


class _Tracer(fx.Tracer):
    """Treats every module with a fusion rule as a leaf and notes the user's source line of each node.

    (fx's own ``record_stack_traces`` costs a second of imports on first use; one frame walk is enough here.)
    """

    def __init__(self, opaque_blocks: bool = False) -> None:
        functions = tuple(f for f in registry.active().python_functions() if inspect.isfunction(f))
        super().__init__(autowrap_functions=functions)
        self.opaque_blocks = opaque_blocks

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Modules with a layer rule are leaves, modules with a container rule are traced through (torch's
        transformer blocks too, unless ``opaque_blocks``); others as fx decides (torch.nn's own are leaves)."""
        rule = registry.active().call_rule(m)
        if rule is not None and not (rule.transparent and self.opaque_blocks and _from_torch(m)):
            return not rule.transparent
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["source"] = _user_frame()
        return node


def _user_frame() -> str | None:
    """The innermost calling frame of the model's own code (outside torch and this package), or None when the
    op comes from a library module alone (an ``nn.Sequential`` model): frames above the tracer are the caller's."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _TRACE_CODE:
            return None
        path = frame.f_code.co_filename
        if not any(part in path for part in _OWN):
            return f"{path}:{frame.f_lineno}: {linecache.getline(path, frame.f_lineno).strip()}"
        frame = frame.f_back
    return None


_TRACE_CODE = fx.Tracer.trace.__code__


def _from_torch(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def _leaf_rule(module: nn.Module) -> bool:
    """Whether the module has a rule that reads its call as one node (container rules are traced through)."""
    rule = registry.active().call_rule(module)
    return rule is not None and not rule.transparent


def trace(model: nn.Module, example_inputs: tuple[tuple, dict] | None = None) -> Traced:
    """The model's graph; with ``example_inputs`` (``(args, kwargs)``) every node also carries its shape.

    Raises:
        UnsupportedPatternError: neither front end can read the model's forward.
    """
    before = set(model.__dict__)
    try:
        try:
            graph = _Tracer().trace(model)
        except Exception:  # noqa: BLE001 - any failure: export reads what fx cannot, given example inputs
            if example_inputs is not None:
                raise
            # without them, torch's transformer blocks (whose forward branches on its input) stay one opaque call
            graph = _Tracer(opaque_blocks=True).trace(model)
    except Exception as fx_error:  # fx raises many types; try export, then surface them as one clear config error
        if example_inputs is None:
            raise UnsupportedPatternError(
                f"torch.fx could not trace {type(model).__name__}.forward ({type(fx_error).__name__}: {fx_error}). "
                "Pass example_inputs so the model can be read with torch.export instead, or register custom "
                "layers with lightning_prune.register_layer so they are treated as leaves."
            ) from fx_error
        return _export(model, example_inputs, fx_error)
    constants = {name: model.__dict__[name] for name in set(model.__dict__) - before}
    try:
        if example_inputs is None:
            return Traced(graph, shapes=False, front_end="fx", constants=constants)
        try:
            _propagate_shapes(model, graph, example_inputs)
        except Exception as shape_error:  # noqa: BLE001 - any failure: let export try, which reports its own
            return _export(model, example_inputs, shape_error)
        return Traced(graph, shapes=True, front_end="fx", constants=constants)
    finally:  # fx keeps the tensors forward makes from literals as attributes of the model: not the user's
        for name in constants:
            delattr(model, name)


# -- shapes on the fx graph ---------------------------------------------------------------------------------------
class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        n.meta["val"] = result
        return result

    def call_module(self, target, args, kwargs):
        """Modules whose rule says they keep their input's shape (BatchNorm) are not run: only shapes matter here."""
        module = self.fetch_attr(target)
        rule = registry.active().call_rule(module)
        if rule is not None and rule.keeps_shape and len(args) == 1 and not kwargs and \
                isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)


class _Run(nn.Module):
    """Runs ``graph`` over ``model`` recording every node's value; a module, so ``functional_call`` can swap the
    model's tensors for meta-device stand-ins while it runs."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        super().__init__()
        self.model = model
        self.graph = graph

    def forward(self, *args):
        return _ShapeInterpreter(self.model, graph=self.graph).run(*args)


def _propagate_shapes(model: nn.Module, graph: fx.Graph, example_inputs: tuple[tuple, dict]) -> None:
    """Shapes and dtypes for every node, with no real compute or memory.

    The graph runs on meta-device stand-ins of the inputs, parameters and buffers (shapes only: C++ meta kernels, a
    few times faster than fake tensors). A forward that makes tensors of its own on a real device cannot mix them
    with meta ones; it runs again under fake tensors, which intercept those too.
    """
    flat = _placeholder_values(model, graph, example_inputs)
    run = _Run(model, graph)
    try:
        stand_ins = {name: torch.empty_like(t, device="meta")
                     for name, t in (*run.named_parameters(), *run.named_buffers())}
        meta = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, flat)
        with eval_mode(model), torch.no_grad():
            torch.func.functional_call(run, stand_ins, tuple(meta), strict=False, tie_weights=True)
    except Exception:  # noqa: BLE001 - tensors made on a real device in forward: fake tensors cover them
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, flat)
        with mode, eval_mode(model), torch.no_grad(), _quiet():
            run(*fake)  # a forward that fails here is reported once, by the caller, not logged op by op


def _placeholder_values(model: nn.Module, graph: fx.Graph, example_inputs: tuple[tuple, dict]) -> list:
    """The value of each placeholder of ``graph`` for ``model.forward(*args, **kwargs)`` (``*args`` spread out)."""
    args, kwargs = example_inputs
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    flat = []
    for node, value in zip(placeholders, bound.arguments.values(), strict=False):
        param = signature.parameters.get(node.target.lstrip("*"))
        if param is not None and param.kind is inspect.Parameter.VAR_POSITIONAL:
            flat.extend(value)
        else:
            flat.append(value)
    return flat


# -- export -------------------------------------------------------------------------------------------------------
def export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``model.forward`` in eval mode. A forward that takes ``use_cache`` (Hugging
    Face decoders) is read without a cache unless told otherwise: a key/value cache is state for generation, not part
    of what the model computes, and export cannot return its type."""
    if "use_cache" not in kwargs and "use_cache" in inspect.signature(model.forward).parameters:
        kwargs = {**kwargs, "use_cache": False}
    with eval_mode(model), torch.no_grad(), _quiet():
        return torch.export.export(model, tuple(args), dict(kwargs), strict=False)


def _export(model: nn.Module, example_inputs: tuple[tuple, dict], fx_error: BaseException) -> Traced:
    args, kwargs = example_inputs
    try:
        program = export(model, args, kwargs)
    except Exception as export_error:
        raise UnsupportedPatternError(
            f"cannot read {type(model).__name__}.forward: torch.fx failed ({type(fx_error).__name__}: {fx_error}) and "
            f"torch.export failed ({type(export_error).__name__}: {export_error})"
        ) from export_error
    lifted = getattr(program.graph_signature, "inputs_to_lifted_tensor_constants", {}).values()
    constants = {target: program.constants[target] for target in lifted if target in program.constants}
    return Traced(_collapse(model, program), shapes=True, front_end="export", constants=constants)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, and no op-by-op error log from fake tensors: a forward that fails is reported once, by us."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _collapse(model: nn.Module, program) -> fx.Graph:
    """Rewrite an exported graph into the fx vocabulary: module calls with rules as ``call_module`` nodes."""
    signature = program.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
              **getattr(signature, "inputs_to_lifted_tensor_constants", {})}
    modules = dict(model.named_modules())
    nodes = list(program.graph.nodes)
    owner: dict[fx.Node, tuple[str, str]] = {}  # node -> (call key, module fqn) of the outermost module with a rule
    for node in nodes:
        if node.op != "call_function":
            continue
        for key, (path, _type) in (node.meta.get("nn_module_stack") or {}).items():
            fqn = module_path(path, modules)
            if fqn is not None and fqn in modules and _leaf_rule(modules[fqn]):
                owner[node] = (key, fqn)
                break
    calls: dict[str, list[fx.Node]] = {}
    for node, (key, _module) in owner.items():
        calls.setdefault(key, []).append(node)
    collapsed: dict[str, tuple[str, list[fx.Node], fx.Node]] = {}  # call key -> (module fqn, its nodes, output)
    aliases: set[fx.Node] = set()  # conversions that return the call's input itself, which code outside reuses
    for key, members in calls.items():
        inside = set(members)
        same = {n for n in members if _returns_input(n, inside)}
        outputs = [n for n in members if n not in same and any(u not in inside for u in n.users)]
        if len(outputs) == 1:
            collapsed[key] = (owner[members[0]][1], members, outputs[0])
            aliases |= same
        else:  # several outputs (an LSTM's tuple): leave its ATen ops to the function rules
            for n in members:
                owner.pop(n)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op == "placeholder":
            new = graph.get_attr(lifted[node.name]) if node.name in lifted else graph.placeholder(node.name)
        elif node.op == "output":
            new = graph.output(tree_map(lambda a: env.get(a, a) if isinstance(a, fx.Node) else a, node.args[0]))
        elif node in aliases:
            env[node] = env[node.args[0]]
            continue
        elif node in owner:
            fqn, members, out = collapsed[owner[node][0]]
            if node is not out:
                continue  # inside the module call: the call_module node stands for it
            inside = set(members)
            inputs: list[fx.Node] = []
            for n in members:
                for a in n.all_input_nodes:
                    if a not in inside and a.name not in lifted and a not in inputs:
                        inputs.append(a)
            new = graph.call_module(fqn, tuple(env[a] for a in inputs))
        else:
            new = graph.node_copy(node, lambda a: env[a])
        new.meta["val"] = node.meta.get("val")
        new.meta["source"] = _export_source(node)
        env[node] = new
    return graph


def _returns_input(node: fx.Node, inside: set[fx.Node]) -> bool:
    """``x.to(dtype)`` that changes nothing returns ``x`` itself, so code after the call may use it as ``x`` (an
    RMSNorm's float32 upcast of a float32 input, reused by the residual)."""
    source = node.args[0] if node.args else None
    if getattr(node.target, "overloadpacket", None) is not torch.ops.aten.to or not isinstance(source, fx.Node):
        return False
    old, new = source.meta.get("val"), node.meta.get("val")
    return (source not in inside and isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)
            and (old.dtype, old.device, old.shape) == (new.dtype, new.device, new.shape))


def user_frame(frames: list[traceback.FrameSummary]) -> str | None:
    """The innermost of ``frames`` (a traceback) in the model's own code, outside torch and this package."""
    for frame in reversed(frames):
        if not any(part in frame.filename for part in _OWN):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return None


def _export_source(node: fx.Node) -> str | None:
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    for path, line, code in reversed(frames):
        if not any(part in path for part in _OWN):
            return f"{path}:{line}: {code.strip()}"
    return None
