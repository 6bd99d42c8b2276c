"""Which attention modules are routed, in a form both eager Python and ``torch.compile`` can follow.

A processor calls its kernel by a module-global name (``dispatch_attention_fn``, or ``F`` for
SDPA). A routed processor runs its own ``__call__`` code unchanged, but with its globals read from
a *shadow* of its module: a real module (registered in ``sys.modules``, which dynamo needs to guard
on globals) that holds everything the original holds, except that the kernel name is accel's
router. The original module is never touched, so unpatched models and other processors keep it.
(The shadow is a copy taken when the processor class is first routed: a global that someone
rebinds in the original module later is not seen by routed processors.)

The routed processor's class is a subclass of its own (one per processor class, same name) whose
``__call__`` says which site is running before the code reaches the router:

* eagerly, by pushing the site's (method, context) on the router's context-variable stack;
* under ``torch.compile``, by a module global holding the attention module's site *tensor* (a
  0-d CPU tensor attribute of the module): dynamo sees a graph input, not a constant, so the
  repeated blocks of ``compile_repeated_blocks`` share one graph, and the router emits one opaque
  op (``torch.ops.accel.routed_attention``) that looks the site up and runs the method eagerly,
  with the step, branch and warm state it finds at run time: nothing of it is guarded on.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import sys
import threading
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from accel.base.adapter import INVOKES_DISPATCH, INVOKES_SDPA, AttentionSite
from accel.base.changes import ChangeLog

SITE_ATTR = "_accel_site"  # the attention module's site tensor (its value: the routed site's id)
_STACK_ATTR = "_accel_site_stack"  # site ids routed on this module, innermost last

# id -> (method, make_context, attention module, kernel: the shadow's router called eagerly)
_SITES: Dict[int, Tuple[Any, Callable, torch.nn.Module, Callable]] = {}
_ids = itertools.count()
_lock = threading.Lock()
_SHADOWS: Dict[Tuple[str, str], types.ModuleType] = {}
_ROUTED_CLASSES: Dict[Tuple[type, str], type] = {}
_CLASS_COUNTS: Dict[int, List[Any]] = {}  # id(processor) -> [original class, routes]

# Under torch.compile only: the site tensor of the attention module whose processor is running.
current_site: Optional[torch.Tensor] = None

# Eagerly: (method, context) entries of the routed processors running now; the router takes the last.
ACTIVE: contextvars.ContextVar[Tuple[Tuple[Any, Any], ...]] = contextvars.ContextVar("accel_active_attention",
                                                                                    default=())


@contextlib.contextmanager
def entered(method: Any, ctx: Any) -> Iterator[None]:
    """While a routed processor runs: its calls go to ``method`` with ``ctx``."""
    entry = (method, ctx)
    ACTIVE.set(ACTIVE.get() + (entry,))
    try:
        yield
    finally:  # remove exactly this entry, whatever ran inside
        ACTIVE.set(tuple(e for e in ACTIVE.get() if e is not entry))


def kernel_name(invokes: str) -> str:
    return "dispatch_attention_fn" if invokes == INVOKES_DISPATCH else "F"


def _shadow(module: types.ModuleType, invokes: str, make_router: Callable[[Any], Any]) -> types.ModuleType:
    key = (module.__name__, invokes)
    shadow = _SHADOWS.get(key)
    if shadow is None:
        name = kernel_name(invokes)
        shadow = types.ModuleType("_accel_routed_" + module.__name__.replace(".", "_"))  # flat: no parent package to import
        shadow.__dict__.update({k: v for k, v in vars(module).items()
                                if k not in ("__name__", "__spec__", "__loader__")})  # __package__ kept: relative imports
        setattr(shadow, name, make_router(getattr(module, name)))
        sys.modules[shadow.__name__] = shadow
        _SHADOWS[key] = shadow
    return shadow


def routed_class(cls: type, invokes: str, make_router: Callable[[Any], Any]) -> Optional[type]:
    """The routed subclass of processor class ``cls`` (None when its module has no kernel global)."""
    if getattr(cls, "_accel_routed", False):
        return cls
    key = (cls, invokes)
    routed = _ROUTED_CLASSES.get(key)
    if routed is not None:
        return routed
    call = cls.__call__
    module = sys.modules.get(getattr(call, "__module__", None) or cls.__module__)
    if module is None or not isinstance(getattr(call, "__code__", None), types.CodeType) \
            or getattr(module, kernel_name(invokes), None) is None:
        return None
    shadow = _shadow(module, invokes, make_router)
    rebound = types.FunctionType(call.__code__, shadow.__dict__, call.__name__, call.__defaults__, call.__closure__)
    rebound.__kwdefaults__ = call.__kwdefaults__

    @functools.wraps(call)  # diffusers reads the processor's signature to filter its kwargs
    def __call__(self, attn, *args, **kwargs):
        site = getattr(attn, SITE_ATTR, None)
        if site is None:
            return rebound(self, attn, *args, **kwargs)
        if torch.compiler.is_compiling():
            return _call_compiled(rebound, site, self, attn, args, kwargs)
        method, make_context, _, _ = _SITES[int(site)]
        with entered(method, make_context()):
            return rebound(self, attn, *args, **kwargs)

    routed = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                         "__qualname__": cls.__qualname__, "_accel_routed": True,
                                         "_accel_shadow": shadow})
    _ROUTED_CLASSES[key] = routed
    return routed


def _call_compiled(rebound, site, processor, attn, args, kwargs):
    global current_site
    current_site = site
    try:
        return rebound(processor, attn, *args, **kwargs)
    finally:
        current_site = None


def route_site(site: AttentionSite, invokes: str, method: Any, make_context: Callable, changes: ChangeLog,
               make_router: Callable[[Any], Any]) -> bool:
    """Route ``site``'s self-attention to ``method`` until ``changes`` is undone. False if its
    processor has no kernel global to route."""
    processor = getattr(site.module, "processor", None)
    cls = routed_class(type(processor), invokes, make_router) if processor is not None else None
    if cls is None:
        return False
    router = getattr(cls._accel_shadow, kernel_name(invokes))
    if invokes == INVOKES_SDPA:
        def kernel(q, k, v, mask, scale, backend, parallel_config):
            return router.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        def kernel(q, k, v, mask, scale, backend, parallel_config):
            return router(q, k, v, attn_mask=mask, scale=scale, backend=backend, parallel_config=parallel_config)
    with _lock:
        site_id = next(_ids)
        _SITES[site_id] = (method, make_context, site.module, kernel)
        _acquire_class(processor, cls)
        _push(site.module, site_id)

    def release() -> None:
        with _lock:
            _pop(site.module, site_id)
            _release_class(processor)
            _SITES.pop(site_id, None)

    changes.on_undo(release)
    return True


def _acquire_class(processor: Any, cls: type) -> None:
    entry = _CLASS_COUNTS.get(id(processor))
    if entry is None:
        entry = _CLASS_COUNTS[id(processor)] = [type(processor), 0]
        processor.__class__ = cls
    entry[1] += 1


def _release_class(processor: Any) -> None:
    entry = _CLASS_COUNTS[id(processor)]
    entry[1] -= 1
    if entry[1] == 0:
        if getattr(type(processor), "_accel_routed", False):  # unless someone else changed it meanwhile
            processor.__class__ = entry[0]
        del _CLASS_COUNTS[id(processor)]


def _push(module: torch.nn.Module, site_id: int) -> None:
    stack = module.__dict__.setdefault(_STACK_ATTR, [])
    stack.append(site_id)
    if SITE_ATTR not in module.__dict__:
        object.__setattr__(module, SITE_ATTR, torch.tensor(site_id, dtype=torch.int64))
    module.__dict__[SITE_ATTR].fill_(site_id)  # in place: a compiled graph reads it as an input


def _pop(module: torch.nn.Module, site_id: int) -> None:
    stack = module.__dict__.get(_STACK_ATTR, [])
    if site_id in stack:
        stack.remove(site_id)
    if stack:
        module.__dict__[SITE_ATTR].fill_(stack[-1])
    else:
        module.__dict__.pop(_STACK_ATTR, None)
        module.__dict__.pop(SITE_ATTR, None)


def compiled_site() -> Optional[torch.Tensor]:
    """The running site's tensor while dynamo traces a routed processor (read in this module, where
    ``_call_compiled`` stored it, so dynamo sees its own pending store)."""
    return current_site


@torch.library.custom_op("accel::routed_attention", mutates_args=())
def routed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                     scale: Optional[float], site_tensor: torch.Tensor, backend: Optional[str],
                     parallel: bool) -> torch.Tensor:
    """One routed call inside a compiled graph: the site's method, run eagerly (the router's own
    eager path), with whatever step, branch and method state hold now."""
    method, make_context, module, kernel = _SITES[int(site_tensor)]
    parallel_config = getattr(module.processor, "_parallel_config", None) if parallel else None
    with entered(method, make_context()):
        out = kernel(query, key, value, attn_mask, scale, backend, parallel_config)
    return out.clone() if out is query or out is key or out is value else out


@routed_attention.register_fake
def _(query, key, value, attn_mask, scale, site_tensor, backend, parallel):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))
