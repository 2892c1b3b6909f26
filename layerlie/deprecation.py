"""Old spellings of the public API, kept working for one release (docs/design.md §2)."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


def renamed(*, positional: Sequence[str] = (), **names: str) -> Callable[[F], F]:
    """Let a function still take its old keyword names and its old positional options.

    Each old spelling binds to the new one and emits a ``DeprecationWarning`` that names the new
    spelling; giving an option both ways is a ``TypeError``.

    Args:
        positional: the options, in their old order, that used to follow the positional
            parameters and are keyword-only now.
        **names: old keyword -> new keyword.

    Example:
        >>> @renamed(draws="samples")
        ... def count(x, *, samples=1):
        ...     return samples
        >>> count(0, samples=3)
        3
    """
    def wrap(fn: F) -> F:
        params = inspect.signature(fn).parameters.values()
        leading = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        where = fn.__qualname__.removesuffix(".__init__")

        def bind(kwargs: dict[str, Any], new: str, value: Any, old: str) -> None:
            if new in kwargs:
                raise TypeError(f"{where}() got {new} twice, {old} and {new}=; pass only {new}=")
            warnings.warn(f"{where}(): {old} is deprecated; pass {new}= instead", DeprecationWarning, stacklevel=3)
            kwargs[new] = value

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            extra = args[leading:leading + len(positional)]
            for name, value in zip(positional, extra):
                bind(kwargs, name, value, f"{name} by position")
            for old, new in names.items():
                if old in kwargs:
                    bind(kwargs, new, kwargs.pop(old), f"{old}=")
            return fn(*args[:leading], *args[leading + len(extra):], **kwargs)

        return cast(F, call)

    return wrap
