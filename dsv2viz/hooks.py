"""Named hook points: places in the forward pass where a user reads or replaces a tensor.

A :class:`HookPoint` is an identity module placed on a tensor worth studying (``hook_c_kv``,
``hook_probs``, ...). Because it is a submodule, its name is its module path, which lines up with the
checkpoint's weight names: ``model.layers.3.self_attn.hook_c_kv`` sits beside
``model.layers.3.self_attn.kv_a_layernorm.weight``. With no function attached a hook point costs one truth
test, so hook points stay in the model everywhere, and the model code asks ``hook.active`` before it
builds a tensor that its fast path would otherwise skip (per-head keys under latent attention, the
pattern under fused attention).

A hook function is called as ``fn(tensor, hook)``; returning a tensor replaces the value (same shape,
dtype and device), returning None leaves it.

Hooks belong to the run that attached them. ``model.hooks(...)``, ``run_with_hooks``, ``run_with_cache``
and a generation's recorder and interventions attach their functions to a *scope*: a context variable,
so they act on the forward passes run inside that ``with`` block, in that thread (or asyncio task), and
nowhere else. A forward pass in another thread, a second dashboard, or a generation paused between two
steps never sees them, and nothing is left attached when a block exits or raises. Attaching is all or
nothing: every name is resolved before any function is attached. The one exception is
:meth:`HookedModule.add_hook`, which attaches a function to the model itself, for every run in every
thread, until the function it returns is called (or ``reset_hooks()``): use it deliberately.

Names may be exact, glob patterns (``*.mlp.gate.hook_topk_idx``) or predicates. A hook function may
carry a ``validate(model)`` attribute (the built-in interventions do): it is called when the hooks are
resolved, so a bad expert, head or dimension index fails before any forward pass. Inside a hook,
:func:`current_positions` gives the absolute sequence positions of the tokens the pass is reading.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import fnmatch
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = Union[str, Iterable[str], Callable[[str], bool]]
#: Resolved hooks: the hook points a function is attached to, in attach order.
Attached = list[tuple["HookPoint", HookFn]]

#: The hooks of the runs active in this context: hook point -> functions, in attach order. Each scope
#: sets a new mapping (never mutated afterwards) and restores the previous one on exit.
_SCOPE: contextvars.ContextVar[Mapping[HookPoint, tuple[HookFn, ...]]] = contextvars.ContextVar(
    "dsv2viz_hooks", default=types.MappingProxyType({})
)


#: Hook points that have functions attached model-wide (HookPoint.add), of any model: usually none, so asking
#: whether a model has any (HookedModule.has_model_wide_hooks) costs nothing per step.
_WITH_FNS: weakref.WeakSet[HookPoint] = weakref.WeakSet()


#: Absolute positions of the tokens the forward pass running in this context reads (set by the model).
_POSITIONS: contextvars.ContextVar[range | None] = contextvars.ContextVar("dsv2viz_positions", default=None)


def current_positions() -> range:
    """The absolute sequence positions of the new tokens of the forward pass now running (for hooks).

    A prefill of 12 tokens reads range(0, 12); the decoding step after it reads range(12, 13). Tensors
    with a T axis (B, T, ...) hold these positions in order; key axes (S) hold range(0, stop).
    """
    positions = _POSITIONS.get()
    if positions is None:
        raise RuntimeError("current_positions() is only defined inside a hook, while the model runs")
    return positions


@contextlib.contextmanager
def reading_positions(start: int, length: int) -> Iterator[None]:
    """Set :func:`current_positions` for the forward pass run inside this block (the model calls it)."""
    token = _POSITIONS.set(range(start, start + length))
    try:
        yield
    finally:
        _POSITIONS.reset(token)


class HookError(RuntimeError):
    """A user's hook function raised or returned something unusable; names the hook point and the function."""


class HookPoint(nn.Module):
    """Identity on one tensor; `shape` documents it, e.g. ``"(B, T, H, S)"``."""

    def __init__(self, shape: str = "") -> None:
        super().__init__()
        self.shape = shape
        self.name = ""  # set by HookedModule.setup_hook_names()
        self._fns: list[HookFn] = []  # attached to the model itself (add_hook), for every run

    @property
    def active(self) -> bool:
        """True when some function is attached for the current run, i.e. when the model must build this tensor."""
        return bool(self._fns) or self in _SCOPE.get()

    def add(self, fn: HookFn) -> Callable[[], None]:
        """Attach `fn` to this hook point for every run; returns a function that detaches it again."""
        self._fns.append(fn)
        _WITH_FNS.add(self)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._fns.remove(fn)
            if not self._fns:
                _WITH_FNS.discard(self)

        return remove

    def clear(self) -> None:
        """Detach the functions attached with :meth:`add` (scoped hooks end with their scope)."""
        self._fns.clear()
        _WITH_FNS.discard(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypasses nn.Module.__call__: free when inactive
        scoped = _SCOPE.get().get(self, ())
        if not self._fns and not scoped:
            return x
        for fn in (*self._fns, *scoped):
            try:
                out = fn(x, self)
            except HookError:
                raise
            except Exception as e:
                raise HookError(f"hook {_fn_name(fn)} at {self.name} raised {type(e).__name__}: {e}") from e
            if out is not None:
                _check_replacement(out, x, fn, self)
                x = out
        return x

    def _torch_hook(self, *args: Any, **kwargs: Any) -> Any:
        raise HookError(
            f"{self.name or 'a HookPoint'} does not run torch module hooks (they would act on every run in every "
            "thread): attach fn(tensor, hook) with model.hooks([(name, fn)]), model.run_with_hooks(..., "
            "fwd_hooks=[(name, fn)]) or model.add_hook(name, fn); returning a tensor from fn replaces the value"
        )

    register_forward_hook = register_forward_pre_hook = _torch_hook
    register_full_backward_hook = register_full_backward_pre_hook = register_backward_hook = _torch_hook

    def extra_repr(self) -> str:
        return self.shape


def _check_replacement(out: object, x: torch.Tensor, fn: HookFn, hook: HookPoint) -> None:
    """A replacement must be a tensor like the value it replaces: same shape, dtype and device."""
    if isinstance(out, torch.Tensor) and (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device):
        return
    got = _describe_tensor(out) if isinstance(out, torch.Tensor) else type(out).__name__
    raise HookError(
        f"hook {_fn_name(fn)} at {hook.name} returned {got}; a replacement must match the input, "
        f"{_describe_tensor(x)} ({hook.shape}), or be None to leave it"
    )


def _describe_tensor(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


@contextlib.contextmanager
def scope(attached: Attached) -> Iterator[None]:
    """Make `attached` hooks act on the forward passes run inside this block, in this context only."""
    if not attached:
        yield
        return
    current = _SCOPE.get()
    merged = dict(current)
    for point, fn in attached:
        merged[point] = (*merged.get(point, ()), fn)
    token = _SCOPE.set(merged)
    try:
        yield
    finally:
        _SCOPE.reset(token)


class ActivationCache(Mapping[str, torch.Tensor]):
    """Tensors captured by `run_with_cache`, by hook name (read-only mapping, detached tensors)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._tensors, n=3)
            hint = f"; did you mean {close}?" if close else f"; the cache holds {len(self._tensors)} names"
            raise KeyError(f"{name!r} was not captured{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def select(self, pattern: str) -> dict[str, torch.Tensor]:
        """The captured tensors whose names match a glob pattern, in forward order."""
        return {k: v for k, v in self._tensors.items() if fnmatch.fnmatchcase(k, pattern)}

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors)"


class HookedModule(nn.Module):
    """Mixin for the root model: finds, attaches and removes hooks by name."""

    def setup_hook_names(self) -> None:
        """Give every HookPoint its module path as its name; call at the end of __init__."""
        self._hook_points: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self._hook_points[name] = module

    @property
    def hook_points(self) -> dict[str, HookPoint]:
        """All hook points by name, in forward order within each layer."""
        return self._hook_points

    def has_model_wide_hooks(self) -> bool:
        """Whether any function is attached to this model for every run (:meth:`add_hook`)."""
        return any(self._hook_points.get(point.name) is point for point in list(_WITH_FNS))

    def hook_names(self, filter: NameFilter | None = None) -> list[str]:
        """Names of the hook points, all or those a glob pattern, list of names or predicate selects."""
        if filter is None:
            return list(self._hook_points)
        return [h.name for h in self._select(filter)]

    def _select(self, filter: NameFilter) -> list[HookPoint]:
        if callable(filter):
            return [h for n, h in self._hook_points.items() if filter(n)]
        patterns = [filter] if isinstance(filter, str) else list(filter)
        found: dict[str, HookPoint] = {}
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"hook names are strings, glob patterns or a predicate; got {pattern!r}")
            if pattern in self._hook_points:
                found[pattern] = self._hook_points[pattern]
                continue
            hits = [n for n in self._hook_points if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                close = difflib.get_close_matches(pattern, self._hook_points, n=3)
                hint = f" Did you mean {close}?" if close else " model.hook_names() lists them all."
                raise KeyError(f"no hook point matches {pattern!r}.{hint}")
            found.update((n, self._hook_points[n]) for n in hits)
        return [self._hook_points[n] for n in self._hook_points if n in found]  # forward order

    def resolve_hooks(self, fwd_hooks: Iterable[tuple[NameFilter, HookFn]]) -> Attached:
        """(hook point, fn) for every selected point of every (filter, fn) pair; raises before returning any.

        A name that matches nothing raises KeyError, a fn that is not callable TypeError, a fn whose
        ``validate(model)`` rejects this model ValueError: nothing is attached from a list with one bad entry.
        """
        attached: Attached = []
        for i, pair in enumerate(fwd_hooks):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"hook {i} is {pair!r}; give (name or pattern, fn) pairs")
            filter, fn = pair
            if not callable(fn):
                raise TypeError(f"hook {i} ({filter!r}): {fn!r} is not callable; give fn(tensor, hook)")
            validate = getattr(fn, "validate", None)
            if validate is not None:  # before the names: "layer 0 is not an MoE layer" says more than "no match"
                validate(self)
            attached += [(point, fn) for point in self._select(filter)]
        return attached

    def add_hook(self, filter: NameFilter, fn: HookFn) -> Callable[[], None]:
        """Attach `fn` to every selected hook point of the model, for every run in every thread, until the
        returned function is called. Prefer :meth:`hooks`, whose hooks belong to the calling block only."""
        removers = [point.add(f) for point, f in self.resolve_hooks([(filter, fn)])]

        def remove() -> None:
            for r in removers:
                r()

        return remove

    def reset_hooks(self) -> None:
        """Detach every function attached with :meth:`add_hook` (scoped hooks end with their block)."""
        for h in self._hook_points.values():
            h.clear()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = ()) -> Iterator[HookedModule]:
        """Attach (filter, fn) pairs to the forward passes run inside this `with` block, in this thread.

        Other threads, other dashboards and generations paused outside the block never see them; they are
        gone when the block exits, raise or not. All names are resolved before anything is attached.
        A thread started inside the block sees them if it runs in a copy of this context
        (``contextvars.copy_context().run``), as the dashboards' generation threads do.
        """
        with scope(self.resolve_hooks(fwd_hooks)):
            yield self

    def run_with_hooks(self, *args: Any, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (), **kwargs: Any) -> Any:
        """One forward pass with temporary hooks."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self, *args: Any, names_filter: NameFilter | None = None, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, ActivationCache]:
        """One forward pass that records the hook points `names_filter` selects (all when None).

        `names_filter` is a name, a glob pattern, a list of them or a predicate on names. Recording a hook
        point makes it active, so tensors the fast path skips get built: select what you need
        (``names_filter="*.hook_pattern"``) rather than everything when the model is large.
        `remove_batch_dim` drops the leading batch dimension (batch size 1 only), as TransformerLens does,
        from every tensor but the routed experts' outputs, whose first dimension is their tokens (N, D).
        """
        store: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = x.detach()

        selected = self._select(names_filter) if names_filter is not None else list(self._hook_points.values())
        with scope([(point, save) for point in selected]):
            out = self(*args, **kwargs)
        if remove_batch_dim:
            batched = [n for n in store if ".mlp.experts." not in n]
            big = [n for n in batched if store[n].shape[0] != 1]
            if big:
                raise ValueError(
                    f"remove_batch_dim needs batch size 1; {big[0]} has batch size {store[big[0]].shape[0]}"
                )
            store.update((n, store[n][0]) for n in batched)
        return out, ActivationCache(store)
