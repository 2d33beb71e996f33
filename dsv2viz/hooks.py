"""Named hook points: places in the forward pass where a user reads or replaces a tensor.

A :class:`HookPoint` is an identity module placed on a tensor worth studying (``hook_c_kv``,
``hook_probs``, ...). Because it is a submodule, its name is its module path, which lines up with the
checkpoint's weight names: ``model.layers.3.self_attn.hook_c_kv`` sits beside
``model.layers.3.self_attn.kv_a_layernorm.weight``. With no function attached a hook point costs one truth
test, so hook points stay in the model everywhere, and the model code asks ``hook.active`` before it
builds a tensor that its fast path would otherwise skip (per-head keys under latent attention, the
pattern under fused attention).

A hook function is called as ``fn(tensor, hook)``; returning a tensor replaces the value (same shape),
returning None leaves it. :class:`HookedModule` gives the model ``hooks()`` (a context manager that
removes its hooks on exit, also when a hook or the forward pass raises), ``run_with_hooks`` and
``run_with_cache``. Names may be exact, glob patterns (``*.mlp.gate.hook_topk_idx``) or predicates.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = Union[str, Iterable[str], Callable[[str], bool]]


class HookError(RuntimeError):
    """A user's hook function raised or returned something unusable; names the hook point and the function."""


class HookPoint(nn.Module):
    """Identity on one tensor; `shape` documents it, e.g. ``"(B, T, H, S)"``."""

    def __init__(self, shape: str = "") -> None:
        super().__init__()
        self.shape = shape
        self.name = ""  # set by HookedModule.setup_hook_names()
        self._fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        """True when some function is attached, i.e. when the model must build this tensor."""
        return bool(self._fns)

    def add(self, fn: HookFn) -> Callable[[], None]:
        """Attach `fn`; returns a function that detaches it again."""
        self._fns.append(fn)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._fns.remove(fn)

        return remove

    def clear(self) -> None:
        self._fns.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypasses nn.Module.__call__: free when inactive
        if not self._fns:
            return x
        for fn in tuple(self._fns):
            try:
                out = fn(x, self)
            except HookError:
                raise
            except Exception as e:
                raise HookError(f"hook {_fn_name(fn)} at {self.name} raised {type(e).__name__}: {e}") from e
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise HookError(
                        f"hook {_fn_name(fn)} at {self.name} returned {got}; a replacement must be a tensor "
                        f"of the input's shape {tuple(x.shape)} {self.shape}, or None to leave it"
                    )
                x = out
        return x

    def extra_repr(self) -> str:
        return self.shape


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


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

    def add_hook(self, filter: NameFilter, fn: HookFn) -> Callable[[], None]:
        """Attach `fn` to every selected hook point until the returned function is called."""
        return _attach(self._select(filter), fn)

    def reset_hooks(self) -> None:
        """Detach every function from every hook point."""
        for h in self._hook_points.values():
            h.clear()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = ()) -> Iterator[HookedModule]:
        """Attach (filter, fn) pairs for the duration of a `with` block; they are removed on exit, raise or not."""
        removers: list[Callable[[], None]] = []
        try:
            for filter, fn in fwd_hooks:
                removers.append(self.add_hook(filter, fn))
            yield self
        finally:
            for r in removers:
                r()

    def run_with_hooks(self, *args: Any, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (), **kwargs: Any) -> Any:
        """One forward pass with temporary hooks."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(self, *args: Any, names: NameFilter | None = None, **kwargs: Any) -> tuple[Any, ActivationCache]:
        """One forward pass that records the selected hook points (all when `names` is None).

        Recording a hook point makes it active, so tensors the fast path skips get built: select what
        you need (``names="*.hook_pattern"``) rather than everything when the model is large.
        """
        store: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = x.detach()

        selected = self._select(names) if names is not None else list(self._hook_points.values())
        remove = _attach(selected, save)
        try:
            out = self(*args, **kwargs)
        finally:
            remove()
        return out, ActivationCache(store)


def _attach(points: Iterable[HookPoint], fn: HookFn) -> Callable[[], None]:
    """Attach `fn` to each point; returns the function that detaches it from all of them."""
    removers = [h.add(fn) for h in points]

    def remove() -> None:
        for r in removers:
            r()

    return remove
