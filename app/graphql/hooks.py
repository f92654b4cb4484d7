"""The schema extensions' lifecycle hooks, wrapped once per extension class (issue 12 §3).

strawberry runs each operation's extensions through a `SchemaExtensionsRunner`: for
every lifecycle step (operation, parsing, validation, execution) it looks at every
extension's hook and wraps it in a context manager — `inspect.isgeneratorfunction`,
then `contextlib.contextmanager(types.MethodType(hook, extension))`, whose
`functools.wraps` copies the hook's name, docstring and dict — for each request
anew.  The schema has seven extensions, so that was 28 wrappers and their metadata
copies per request, about a tenth of the app's CPU for `{ viewer { role } }` (py-spy
of the ASGI app, bench/RESULTS.md 2026-11-30 13:00).

`CachedHooksRunner` makes the same context managers from a factory built once per
(extension class, step): `contextlib.contextmanager(hook)` applied to the class's
function, called with the extension.  The context manager each request enters is
the one strawberry would have made — a `_GeneratorContextManager` (or its async
twin) over the same generator — entered and exited on the same exit stacks in the
same order, so exceptions, suppression and ordering are exactly strawberry's.
Hooks of other shapes (a plain function or coroutine function) go through
strawberry's own wrapping, uncached.

Results (`get_results`) are asked only of extensions whose class overrides it:
the base class's answer is an empty dict, which adds nothing to the result.

Errors: none of its own; whatever a hook raises propagates as under strawberry's
runner.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any

from strawberry.extensions import SchemaExtension
from strawberry.extensions.context import (
    ExecutingContextManager,
    ExtensionContextManagerBase,
    OperationContextManager,
    ParsingContextManager,
    ValidationContextManager,
    WrappedHook,
)
from strawberry.extensions.runner import SchemaExtensionsRunner
from strawberry.types import ExecutionContext
from strawberry.utils.await_maybe import await_maybe

# (extension class, hook name) -> (context manager factory, is_async), or None when
# the class does not override the hook, or False when strawberry wraps it itself
# (a hook that is a plain function or coroutine function).
_Factory = tuple[Callable[[SchemaExtension], Any], bool]
_FACTORIES: dict[tuple[type[SchemaExtension], str], _Factory | bool | None] = {}

stats = {"built": 0}  # factories built (tests: once per class and step, not per request)


def _factory(kind: type[SchemaExtension], name: str) -> _Factory | bool | None:
    hook = getattr(kind, name)
    if hook is getattr(SchemaExtension, name):
        return None
    stats["built"] += 1
    if inspect.isgeneratorfunction(hook):
        return contextlib.contextmanager(hook), False
    if inspect.isasyncgenfunction(hook):
        return contextlib.asynccontextmanager(hook), True
    return False


class _CachedHooks(ExtensionContextManagerBase):
    """A step's context manager whose hooks come from the per-class factories."""

    __slots__ = ()

    def get_hook(self, extension: SchemaExtension) -> WrappedHook | None:
        key = (type(extension), self.HOOK_NAME)
        try:
            made = _FACTORIES[key]
        except KeyError:
            made = _FACTORIES[key] = _factory(type(extension), self.HOOK_NAME)
        if made is None:
            return None
        if isinstance(made, bool):  # a plain (coroutine) function: strawberry's wrapping
            return super().get_hook(extension)
        factory, is_async = made
        return WrappedHook(extension=extension, hook=functools.partial(factory, extension),
                           is_async=is_async)


class _Operation(_CachedHooks, OperationContextManager):
    __slots__ = ()


class _Parsing(_CachedHooks, ParsingContextManager):
    __slots__ = ()


class _Validation(_CachedHooks, ValidationContextManager):
    __slots__ = ()


class _Executing(_CachedHooks, ExecutingContextManager):
    __slots__ = ()


class CachedHooksRunner(SchemaExtensionsRunner):
    """strawberry's runner with the hooks wrapped once per class (module docstring)."""

    def operation(self) -> OperationContextManager:
        return _Operation(self.extensions)

    def validation(self) -> ValidationContextManager:
        return _Validation(self.extensions)

    def parsing(self) -> ParsingContextManager:
        return _Parsing(self.extensions)

    def executing(self) -> ExecutingContextManager:
        return _Executing(self.extensions)

    async def get_extensions_results(self, ctx: ExecutionContext) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for extension in self.extensions:
            if type(extension).get_results is not SchemaExtension.get_results:
                data.update(await await_maybe(extension.get_results()))
        data.update(ctx.extensions_results)
        return data
