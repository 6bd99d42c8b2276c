"""Route the self-attention of chosen modules to an accel attention method.

How it works, and why it is shaped this way:

* diffusers processors call the attention kernel by a module-global name: ``dispatch_attention_fn``
  (Wan, HunyuanVideo, LTX, FLUX; q/k/v as (B, S, H, D)) or ``F.scaled_dot_product_attention``
  (CogVideoX and other older processors; (B, H, S, D)). Rewriting each processor would copy every
  model's projection/RoPE code, so instead a routed processor runs its own code with that one name
  bound to a router (``sites.py``: a shadow of its module; the module itself is never changed).
* The router does nothing on its own: it calls the original unless a routed processor is running
  (``sites.py`` says which site: eagerly through a stack in a context variable, where each call
  removes exactly the entry it pushed; under ``torch.compile`` through one opaque op per call). So
  unpatched models, cross-attention and text refiners keep the original path, bit for bit.
* A routed method's dense paths (its fallbacks, warm-up steps, dense layers, density 1.0) run the
  caller's own kernel: diffusers' dispatcher with the backend and scale the processor passed
  (``set_attention_backend``, ``attention_backend(...)``), so "falls back" is bit-identical to the
  unpatched call under every backend. Where that backend is itself approximate (SageAttention),
  the method still replaces it on the calls it takes, with one warning.
* Under diffusers' context parallelism the processor passes its ``parallel_config``: the method
  then runs inside diffusers' Ulysses all-to-all (``context_parallel.py``), or, where it cannot
  (ring), the call keeps diffusers' own path.
"""
from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

from accel.base.adapter import INVOKES_DISPATCH, AttentionSite
from accel.base.changes import ChangeLog
from accel.base.context import AttnContext
from accel.base.parallel import context_parallel_config

from . import sites

# The caller's own exact attention while a routed call runs, as (fn, whether fn takes a scale):
# diffusers' dispatcher with the processor's backend, or ComfyUI's ``optimized_attention``, so that
# a method's dense paths (dense method, warm-up steps, fallbacks) are exactly the caller's.
_HOST_DENSE: contextvars.ContextVar[Optional[Tuple[Callable, bool]]] = contextvars.ContextVar(
    "accel_host_dense", default=None)

# (method, context) entries of the routed processors running now (``sites.entered``); the last wins.
_ACTIVE = sites.ACTIVE


def routed_entries() -> Tuple[Tuple[Any, AttnContext], ...]:
    """What the router would route to now (empty outside a patched attention module)."""
    return _ACTIVE.get()


def _route(query, key, value, attn_mask, scale, exact: Optional[Callable] = None,
           refused: Optional[str] = None) -> Optional[torch.Tensor]:
    """The method's output for a routed call, or None when no patched module is running.

    ``exact(q, k, v, attn_mask, scale)``: the caller's own kernel with the caller's arguments
    (diffusers' dispatcher and the backend the processor asked for), which every dense path of the
    method then runs, so a fallback is bit-identical to the unpatched call.
    """
    active = _ACTIVE.get()
    if not active:
        return None
    method, ctx = active[-1]
    # Clear while the method runs so its own dense fallback is not routed again.
    token = _ACTIVE.set(())
    dense_token = _HOST_DENSE.set((exact, True)) if exact is not None else None
    try:
        extra = {"refused": refused} if refused is not None else {}
        return method.run(query, key, value, ctx, attn_mask=attn_mask, scale=scale, **extra)
    finally:
        if dense_token is not None:
            _HOST_DENSE.reset(dense_token)
        _ACTIVE.reset(token)


def _route_context_parallel(query, key, value, attn_mask, scale, exact: Callable, parallel_config: Any,
                            config: Any) -> Optional[torch.Tensor]:
    """A routed call under diffusers' context parallelism: the method as Ulysses' kernel, or
    diffusers' own path (``exact``) with the reason counted and warned once."""
    from . import context_parallel

    method, ctx = _ACTIVE.get()[-1]
    reason = context_parallel.refusal(config, query, key, value, attn_mask, ctx.layout)
    if reason is not None:
        return _route(query, key, value, attn_mask, scale, exact, refused=reason)
    token = _ACTIVE.set(())
    dense_token = _HOST_DENSE.set(None)  # inside the all-to-all, dense paths run torch SDPA on the held heads
    try:
        return context_parallel.ulysses_attention(method, ctx, query, key, value, scale, parallel_config, config)
    finally:
        _HOST_DENSE.reset(dense_token)
        _ACTIVE.reset(token)


# diffusers backends that are themselves approximate (quantized): a routed method replaces them on
# the calls it takes, and its dense paths run them; said once per method.
APPROXIMATE_BACKENDS = ("sage",)


def _backend_name(backend: Any) -> Optional[str]:
    """The diffusers backend a dispatch call will use: the one it names, else the active one."""
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry.get_active_backend()[0]
        except (ImportError, AttributeError):
            return None
    return str(getattr(backend, "value", backend))


def _warn_if_backend_approximate(backend: Any) -> None:
    name = _backend_name(backend)
    active = _ACTIVE.get()
    if name is None or not active or not any(part in name for part in APPROXIMATE_BACKENDS):
        return
    method = active[-1][0]
    if getattr(method, "name", None) != "dense":
        method.warn_once(f"the transformer's attention backend {name!r} is itself approximate; accel's "
                         f"{method.name!r} replaces it on the calls it routes, and its dense paths run {name!r}")


def _dispatch_router(original: Callable) -> Callable:
    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        # GQA, dropout, causal masks and backend-specific kwargs stay on the original path.
        plain = not (dropout_p or is_causal or enable_gqa or attention_kwargs)
        out = None
        if plain and torch.compiler.is_compiling():
            out = _compiled_call(query, key, value, attn_mask, scale, backend, parallel_config is not None)
        elif plain and _ACTIVE.get():
            _warn_if_backend_approximate(backend)

            def exact(q, k, v, mask, scale_):  # the processor's own dispatch, its backend included
                return original(q, k, v, attn_mask=mask, scale=scale_, backend=backend, parallel_config=parallel_config)

            context_parallel = context_parallel_config(parallel_config) if parallel_config is not None else None
            if context_parallel is None:
                out = _route(query, key, value, attn_mask, scale, exact)
            else:
                out = _route_context_parallel(query, key, value, attn_mask, scale, exact, parallel_config,
                                              context_parallel)
        if out is not None:
            return out
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs,
                        backend=backend, parallel_config=parallel_config)

    dispatch_attention_fn.__accel_router__ = True
    return dispatch_attention_fn


class _FunctionalWithRoutedSDPA(types.ModuleType):
    """Stands in for ``torch.nn.functional`` inside one processor module; only SDPA is routed."""

    def __init__(self, original_functional: types.ModuleType):
        super().__init__(original_functional.__name__)
        self._functional = original_functional
        self.__accel_router__ = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functional, name)

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if torch.compiler.is_compiling() and not (dropout_p or is_causal or enable_gqa):
            out = _compiled_call(query, key, value, attn_mask, scale, None, False)
            if out is not None:
                return out
        elif _ACTIVE.get() and not (dropout_p or is_causal or enable_gqa):
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            out = _route(q, k, v, attn_mask, scale)
            if out is not None:
                return out.transpose(1, 2)
        return self._functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)


def route_module(site: AttentionSite, invokes: str, method: Any, make_context: Callable[[], AttnContext],
                 changes: ChangeLog) -> bool:
    """Route ``site``'s attention to ``method`` until ``changes`` is undone; False if its processor
    calls no kernel global accel can bind."""
    make_router = _dispatch_router if invokes == INVOKES_DISPATCH else _FunctionalWithRoutedSDPA
    return sites.route_site(site, invokes, method, make_context, changes, make_router)


def _compiled_call(query, key, value, attn_mask, scale, backend: Any, parallel: bool) -> Optional[torch.Tensor]:
    """Inside torch.compile: the routed call as one opaque op, or None (not routed, or a call that
    needs a backward pass: the op has none, so those keep the original, traceable path)."""
    site = sites.compiled_site()
    if site is None or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return None
    name = None if backend is None else str(getattr(backend, "value", backend))
    return torch.ops.accel.routed_attention(query, key, value, attn_mask, scale, site, name, parallel)


@contextlib.contextmanager
def host_dense_attention(fn: Callable) -> Iterator[None]:
    """While the block runs, ``dense_attention`` calls ``fn(q, k, v, attn_mask)`` ((B, S, H, D)
    tensors) instead of torch SDPA, for calls without a custom scale."""
    token = _HOST_DENSE.set((fn, False))
    try:
        yield
    finally:
        _HOST_DENSE.reset(token)


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Exact attention for (B, S, H, D) inputs: the caller's own kernel where it gave one (the
    dispatcher and backend a diffusers processor called, ComfyUI's attention), else torch SDPA."""
    host = _HOST_DENSE.get()
    if host is not None and (scale is None or host[1]):
        fn, takes_scale = host
        return fn(query, key, value, attn_mask, scale) if takes_scale else fn(query, key, value, attn_mask)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)
