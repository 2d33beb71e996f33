"""Rendering a checkpoint's Jinja chat template with limits on what it may build and how long it may run.

A chat template is code that comes with the checkpoint. Jinja's immutable sandbox already keeps it from
reaching Python internals or changing its inputs, and caps ``range`` at 100,000 numbers; here we also
bound the work and the memory it may take:

- **values**: every operation that can make a value much larger than its inputs is sized *before* it
  runs and refused past ``max_chars`` (``*`` and ``**``, ``+``, ``%`` and ``str.format`` with their
  widths, ``~`` concatenation, string methods such as ``replace``/``join``/``center``, and the filters
  that grow text); anything else a call returns is measured after;
- **output**: the template is rendered as a stream, so output past ``max_chars`` stops it;
- **work**: every loop iteration, every call (macros included, so recursion too) and every item a filter
  generates is a step, counted against ``max_steps`` and a wall-clock ``max_seconds``, so a loop that
  outputs nothing stops as well.

Every limit raises :class:`ChatTemplateLimit`, which names the limit that was hit.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jinja2 import TemplateError, nodes, pass_context
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Characters in the rendered text and in any value built on the way: about 25 times DeepSeek-V2's
#: 163,840-token context, so no real conversation comes near it.
MAX_CHARS = 2**22
#: Loop iterations and calls: DeepSeek's template takes about two per message.
MAX_STEPS = 250_000
MAX_SECONDS = 10.0
#: Characters of the template itself: real chat templates have a few thousand; compiling costs per character.
MAX_TEMPLATE_CHARS = 2**18
#: Bits of an integer a template may compute (``**`` and ``*`` on numbers): far beyond any real use.
MAX_INT_BITS = 2**16

_STEP_FILTER = "_dsv2viz_step"


class ChatTemplateLimit(TemplateError):
    """A chat template went past one of its limits; the message names the limit."""


class _Budget:
    """What one render may still do: steps before `max_steps`, time before the deadline, `max_chars` per value."""

    def __init__(self, max_chars: int, max_steps: int, max_seconds: float) -> None:
        self.max_chars, self.max_steps, self.max_seconds = max_chars, max_steps, max_seconds
        self.steps = 0
        self.deadline = time.monotonic() + max_seconds

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise ChatTemplateLimit(
                f"it ran past {self.max_steps:,} steps (loop iterations and calls), the limit that keeps a "
                "template from running forever"
            )
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimit(f"it ran past {self.max_seconds:g} seconds, the limit on rendering time")

    def size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise ChatTemplateLimit(
                f"{what} would hold {n:,} characters, over the limit of {self.max_chars:,} on any value or output"
            )

    def counted(self, items: Iterable) -> Iterator:
        for item in items:
            self.step()
            yield item


def _length(value: Any) -> int:
    """How big a value is: characters of a string, items of a collection, (bits / 8) of an int; else 0."""
    if isinstance(value, (str, list, tuple, dict)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 8
    return 0


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*|\*)(?:\.(\d*|\*))?")
_BRACE_FIELD = re.compile(r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


def _format_size(fmt: str, args: Iterable, kwargs: dict | None = None) -> int:
    """An upper bound on the length of ``fmt % args`` or ``fmt.format(*args, **kwargs)``: the format, every
    width and precision it names, the text of every argument, and (where widths come from the arguments,
    ``%*d`` or ``{:{w}}``) the integers among them."""
    values = [*args, *(kwargs or {}).values()]
    widths = 0
    for field in _PERCENT_FIELD.finditer(fmt):
        widths += sum(int(n) for n in field.groups() if n and n != "*")
    for field in _BRACE_FIELD.finditer(fmt):
        widths += sum(int(n) for n in re.findall(r"\d+", field.group()))
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):
        widths += sum(abs(v) for v in values if isinstance(v, int))
    return len(fmt) + widths + sum(len(str(v)) for v in values)


def _percent_args(right: Any) -> list:
    if isinstance(right, tuple):
        return list(right)
    if isinstance(right, dict):
        return list(right.values())
    return [right]


class _ChatCodeGenerator(CodeGenerator):
    """Jinja's compiler with two changes: every ``{% for %}`` iterates through the step counter, and ``~``
    concatenation is sized before it joins (neither is reachable through the sandbox's own hooks)."""

    def visit_Template(self, node: nodes.Template, frame: Any = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, _STEP_FILTER, [], [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.sized_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every operation that can grow a value sized against one render's budget."""

    code_generator_class = _ChatCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, budget: _Budget) -> None:
        # optimized=False: Jinja would otherwise run constant filters and concatenations while compiling
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], optimized=False)
        self.budget = budget
        self.filters = {name: self._sized_filter(name, f) for name, f in self.filters.items()}

        @pass_context
        def step(context: Context, items: Iterable) -> Iterator:
            return budget.counted(items)

        self.filters[_STEP_FILTER] = step

    # ----- what a template computes ---------------------------------------------------------------------
    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.step()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            if ints:
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise ChatTemplateLimit(f"a product would have over {MAX_INT_BITS:,} bits")
            elif isinstance(left, int) or isinstance(right, int):  # repetition of a string or a list
                times = left if isinstance(left, int) else right
                budget.size(max(times, 0) * _length(right if times is left else left), "a repetition (*)")
        elif operator == "**" and ints and abs(left) > 1 and right > 0:
            if right * left.bit_length() > MAX_INT_BITS:
                raise ChatTemplateLimit(f"a power (**) would have over {MAX_INT_BITS:,} bits")
        elif operator == "+" and not ints:
            budget.size(_length(left) + _length(right), "a concatenation (+)")
        elif operator == "%" and isinstance(left, str):
            budget.size(_format_size(left, _percent_args(right)), "a % format")
        return super().call_binop(context, operator, left, right)

    def sized_concat(self, parts: Iterable) -> str:
        """``~`` concatenation: the joined text, refused before joining when too long."""
        texts = [str(p) for p in parts]
        self.budget.size(sum(map(len, texts)), "a concatenation (~)")
        return "".join(texts)

    def concat(self, parts: Iterable) -> str:  # Jinja's join of a macro's or a block's captured output
        return self.sized_concat(parts)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = __self.budget
        budget.step()
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, str):
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:  # n items and n - 1 separators
                args = (list(args[0]), *args[1:])
                budget.size(_join_size(args[0], receiver), "str.join")
            else:
                budget.size(_str_method_size(receiver, name, args, kwargs), f"str.{name}")
        result = super().call(__context, __obj, *args, **kwargs)
        budget.size(_length(result), "a call's result")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, budget = value.__self__, self.budget

        def sized(*args: Any, **kwargs: Any) -> str:
            budget.size(_format_size(fmt, args, args[0] if value.__name__ == "format_map" else kwargs), "str.format")
            return wrapped(*args, **kwargs)

        return functools.update_wrapper(sized, wrapped)

    def _sized_filter(self, name: str, f: Callable) -> Callable:
        """Filter `f`, with the filters that grow text sized before they run and every result after."""
        budget = self.budget
        before = _FILTER_SIZES.get(name)

        @functools.wraps(f)  # keeps Jinja's pass_context / pass_eval_context marks
        def sized(*args: Any, **kwargs: Any) -> Any:
            budget.step()
            if before is not None:  # a range or a generator is measured as the list it makes
                args = tuple(list(a) if _unsized_iterable(a) else a for a in args)
            own = _without_context(f, args)
            for n in [*own, *kwargs.values()]:  # counts and widths: batch(10**9, 'x') pads a list to 10**9
                if isinstance(n, int) and n > budget.max_chars:
                    raise ChatTemplateLimit(
                        f"the {name} filter was given {n:,}, over the limit of {budget.max_chars:,} on any count"
                    )
            if before is not None:
                budget.size(before(*own, **kwargs), f"the {name} filter")
            result = f(*args, **kwargs)
            if isinstance(result, Iterator):  # map, select, slice, batch...: each item produced is a step
                return budget.counted(result)
            budget.size(_length(result), f"the {name} filter")
            return result

        return sized


def _unsized_iterable(value: Any) -> bool:
    return isinstance(value, (range, Iterator))


def _without_context(f: Callable, args: tuple) -> tuple:
    """A filter's own arguments, without the context/eval context/environment Jinja passes first."""
    return args[1:] if getattr(f, "jinja_pass_arg", None) is not None else args


def _str_method_size(s: str, name: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on the length of ``s.<name>(*args, **kwargs)`` for the string methods that can grow a string."""
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        return max(len(s), args[0])
    if name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) * max(tabsize, 1) if isinstance(tabsize, int) else len(s)
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        return _replace_size(s, *args[:3])
    return len(s)


def _replace_size(s: str, old: str, new: str, count: int | None = None) -> int:
    """The exact length of ``s.replace(old, new, count)``, computed without building it."""
    found = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        found = min(found, count)
    return len(s) + found * (len(new) - len(old))


def _indent_size(s: str, width: int | str = 4, *args: Any, **kwargs: Any) -> int:
    per_line = width if isinstance(width, int) else len(str(width))
    return len(str(s)) + (str(s).count("\n") + 1) * max(per_line, 0)


def _join_size(items: Any, separator: Any = "", *args: Any, **kwargs: Any) -> int:
    """The length of n items joined by n - 1 separators."""
    items = items if isinstance(items, (list, tuple, dict, str)) else ()
    return sum(len(str(x)) for x in items) + len(str(separator)) * max(len(items) - 1, 0)


def _wordwrap_size(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, *a: Any) -> int:
    """textwrap starts at most one line per character, each after a `wrapstring`."""
    return len(str(s)) * (1 + len(str(wrapstring or "\n")))


def _tojson_size(value: Any, indent: Any = None) -> int:
    """Each line of the JSON (at most one per character of the compact form) indented `indent` per level."""
    if not isinstance(indent, int) or indent <= 16:
        return 0  # small indents: measured after
    return len(json.dumps(value, default=str)) * (1 + indent)


#: Upper bounds on the output of the built-in filters that can make text longer than their input, checked
#: before they run (the others are measured after).
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda s, width=80: max(len(str(s)), width if isinstance(width, int) else 0),
    "indent": _indent_size,
    "replace": lambda s, old, new, count=None: _replace_size(str(s), str(old), str(new), count),
    "join": _join_size,
    "format": lambda value, *args, **kwargs: _format_size(str(value), args, kwargs),
    "wordwrap": _wordwrap_size,
    "tojson": _tojson_size,
}


def render_chat_template(
    template: str,
    variables: dict[str, Any],
    *,
    globals: dict[str, Any] | None = None,
    max_chars: int = MAX_CHARS,
    max_steps: int = MAX_STEPS,
    max_seconds: float = MAX_SECONDS,
) -> str:
    """`template` rendered with `variables` inside the limits; ChatTemplateLimit when one is hit, any
    other TemplateError (or Python error) when the template itself fails."""
    budget = _Budget(max_chars, max_steps, max_seconds)
    env = _ChatEnvironment(budget)
    env.globals.update(globals or {})
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateLimit(
            f"the template has {len(template):,} characters, over the limit of {MAX_TEMPLATE_CHARS:,} "
            "(real chat templates have a few thousand)"
        )
    out: list[str] = []
    size = 0
    for chunk in env.from_string(template).generate(**variables):
        size += len(chunk)
        budget.size(size, "the rendered text")
        out.append(chunk)
    return "".join(out)
