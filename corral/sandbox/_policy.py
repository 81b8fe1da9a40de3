"""Language-level policy for connector code: guarded builtins, imports and module views.

Child side: this module is imported by the zygote and used in the sandbox
child. It must not import anything from the host side of corral.

RestrictedPython compiles the code so that attribute access, item access,
iteration, writes and printing go through the guards defined here. It is one
layer: the OS layers (cgroups, rlimits, a fresh process) hold without it.
"""

from __future__ import annotations

import _string
import abc
import builtins
import collections
import functools
import hashlib
import importlib
import operator
import string
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

from RestrictedPython import compile_restricted_exec, safe_builtins
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
)
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

from corral.config._imports import view_attributes
from corral.sandbox._language import CLASS_METHODS, ConnectorTransformer, is_dunder

#: Builtins added to RestrictedPython's conservative set; none reaches the host. `range`
#: is the real one: the cgroup, the CPU limit and the heartbeat bound a long loop, not a
#: 1000-element cap. `type` and `vars` are Guards' own versions.
_EXTRA_BUILTINS: tuple[str, ...] = (
    "NotImplemented", "all", "any", "ascii", "bin", "bytearray", "bytes", "classmethod",
    "dict", "dir", "enumerate", "filter", "format", "frozenset", "iter", "list", "map", "max",
    "min", "next", "object", "property", "range", "reversed", "set", "sorted", "staticmethod",
    "sum", "super", "tuple", "zip",
    *(name for name, value in vars(builtins).items()  # not the groups: see except* CVE-2025-22153
      if isinstance(value, type) and issubclass(value, BaseException)
      and not issubclass(value, BaseExceptionGroup)),
)  # fmt: skip

#: Attributes starting with `_` that foreign objects show as public API (namedtuple's).
#: Not `_field_defaults`: a dict the class shares with every execution.
_PUBLIC_UNDERSCORED = frozenset({"_asdict", "_replace", "_fields", "_make"})
#: Special attributes any object may show: they describe it and reach nothing.
_DESCRIPTIVE = frozenset({"__name__", "__qualname__", "__doc__"})
#: Special attributes the connector's own objects show besides their special methods.
_OWN_SPECIAL = frozenset({"__class__", "__dict__", "__module__"})
_WHY = {
    "mro": "it hands out the classes a class derives from, Enum's class factory among them",
    "__new__": "define classes with `class`",
    "register": "it would change what isinstance() answers for every later execution",
}
#: Containers connector code may write into, whoever made them: none that a module or a
#: class shares can be reached through a public name (see corral.config._imports).
_WRITABLE = (dict, list, set, bytearray, collections.deque)

_INPLACE_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
    "&=": operator.iand,
    "^=": operator.ixor,
    "|=": operator.ior,
    "@=": operator.imatmul,
}


_BASE_BUILTINS: dict[str, Any] = {
    **safe_builtins,
    **{name: getattr(builtins, name) for name in _EXTRA_BUILTINS},
}
_BASE_BUILTINS.pop("_getattr_")  # RestrictedPython's; Guards put their own in the globals


CONNECTOR_MODULE = "connector"  # __module__ of what connector code defines


class PolicyError(Exception):
    """Raised inside the sandbox when the code touches something forbidden."""


def compile_connector(source: str, filename: str = "<connector>") -> tuple[Any, str | None, str]:
    """Compile `source` under RestrictedPython.

    Returns `(code, None, "")` or `(None, error_type, message)` where the
    type is `code_error` (the source is not valid Python) or
    `policy_violation` (valid Python the policy forbids).
    """
    try:
        compile(source, filename, "exec", dont_inherit=True, flags=0x400)  # PyCF_ONLY_AST
    except SyntaxError as exc:
        return None, "code_error", f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except (ValueError, RecursionError, MemoryError) as exc:
        return None, "code_error", f"{type(exc).__name__}: the source cannot be compiled: {exc}"
    try:
        result = compile_restricted_exec(source, filename=filename, policy=ConnectorTransformer)
    except SyntaxError as exc:  # found by the compiler, not the parser: `return` outside a def
        return None, "code_error", f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except (RecursionError, MemoryError) as exc:
        return None, "code_error", f"{type(exc).__name__}: the source is too deeply nested"
    except Exception as exc:  # whatever else the compiler says, the source is at fault
        return None, "code_error", f"{type(exc).__name__}: the source cannot be compiled: {exc}"
    if result.errors:
        return None, "policy_violation", "; ".join(e.rstrip(".") for e in result.errors)
    return result.code, None, ""


class CompileCache:
    """Compiled connector code by the SHA-256 of its source, bounded in entries and bytes.

    The least recently used entries go first.
    """

    def __init__(self, size: int, max_bytes: int, filename: str, *, plain: bool = False) -> None:
        self.plain = plain  # UNSAFE, for corral's own tests of the OS layers: no language layer
        self.size = size
        self.max_bytes = max_bytes
        self.filename = filename
        self._bytes = 0
        self.misses = 0
        self._entries: collections.OrderedDict[str, tuple[int, tuple[Any, str | None, str]]] = (
            collections.OrderedDict()
        )

    def get(self, source: str) -> tuple[Any, str | None, str]:
        """The compiled code of `source` (see compile_connector), compiling on a miss."""
        raw = source.encode("utf-8", "surrogatepass")
        key = hashlib.sha256(raw).hexdigest()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry[1]
        self.misses += 1
        compiled = (
            (compile(source, self.filename, "exec"), None, "")
            if self.plain
            else compile_connector(source, self.filename)
        )
        if len(raw) <= self.max_bytes:
            self._entries[key] = (len(raw), compiled)
            self._bytes += len(raw)
            while len(self._entries) > self.size or self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][0]
        return compiled


class Tripwire:
    """Every policy violation of the running execution, also those the code caught."""

    def __init__(self) -> None:
        self.violations: list[str] = []

    def trip(self, message: str) -> PolicyError:
        """Record a violation; the exception to raise."""
        self.violations.append(message)
        return PolicyError(message)


def _frozen(value: Any) -> Any:
    """An immutable copy of a module's container (hashlib.algorithms_available is a set),
    and a plain function in front of a cached one (urllib.parse.urlsplit): its cache would
    tell one execution what an earlier one asked for."""
    if callable(value) and hasattr(value, "cache_info"):
        cached = value

        def uncached(*args: Any, **kwargs: Any) -> Any:
            return cached(*args, **kwargs)

        uncached.__name__ = getattr(cached, "__name__", "function")
        return uncached
    if isinstance(value, set):
        return frozenset(value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return types.MappingProxyType(dict(value))
    return value


#: Set by a worker's control thread when it stops an execution: a sleep in C would not
#: see the asynchronous exception until it ended by itself.
SLEEP_CUT = threading.Event()


def _sleep(seconds: float) -> None:
    """time.sleep for connector code: the same, but cut short when the execution is stopped."""
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    SLEEP_CUT.wait(seconds)


def _strptime(string: str, format: str = "%a %b %d %H:%M:%S %Y") -> Any:
    """time.strptime for connector code. The C function imports `_strptime` on every
    call through the caller's `__import__`, which refuses it to connector code."""
    import _strptime

    return _strptime._strptime_time(str.__str__(string), str.__str__(format))


def warm_lazy_imports() -> None:
    """Import now what allowed C functions import on first use through the running code's
    `__import__` (connector code's refuses them): datetime.strptime keeps `_strptime` once
    it has it. Call before any connector code runs (the zygote does)."""
    import datetime

    datetime.datetime.strptime("2000", "%Y")


def _wraps(wrapped: Any) -> Callable[[Any], Any]:
    """functools.wraps for connector code: the wrapper takes the wrapped one's __name__,
    __qualname__ and __doc__, and nothing else (the real one copies whatever attributes
    the caller names, `__dict__` and `__wrapped__` included)."""

    def decorate(wrapper: Any) -> Any:
        if not (
            isinstance(wrapper, types.FunctionType)
            and wrapper.__globals__.get("__name__") == CONNECTOR_MODULE
        ):
            raise TypeError("functools.wraps() decorates a function the connector defines")
        for name in ("__name__", "__qualname__", "__doc__"):
            value = getattr(wrapped, name, None)
            if type(value) is str or (name == "__doc__" and value is None):
                setattr(wrapper, name, value)
        return wrapper

    return decorate


_REPLACEMENTS: dict[tuple[str, str], Any] = {
    ("functools", "wraps"): _wraps,
    ("time", "sleep"): _sleep,
    ("time", "strptime"): _strptime,
}


def _module_view(module: types.ModuleType, name: str, tripwire: Tripwire) -> types.ModuleType:
    """A fresh module holding only the attributes SAFE_MODULES lists for `name`.

    Asking it for a name the real module has but the view hides trips the wire.
    """
    view = types.ModuleType(name)
    shown = [attr for attr in view_attributes(name) if hasattr(module, attr)]
    for attr in shown:
        value = _REPLACEMENTS.get((name, attr)) or _frozen(getattr(module, attr))
        setattr(view, attr, value)

    def hidden(attr: str) -> Any:
        if not attr.startswith("__") and hasattr(module, attr):
            raise tripwire.trip(
                f"`{name}.{attr}` is not available to connector code; "
                f"{name} offers {', '.join(shown)}"
            )
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    view.__getattr__ = hidden  # type: ignore[method-assign]  # PEP 562: missing names only
    return view


class ImportPolicy:
    """The modules connector code may import, served as safe views."""

    def __init__(self, allowed: Iterable[str], *, unsafe_plain_python: bool = False) -> None:
        self.allowed = tuple(sorted(set(allowed)))
        # UNSAFE, for corral's own tests: connector code gets the real builtins and imports,
        # so that a test can prove the OS layers hold with no language layer above them.
        self.unsafe_plain_python = unsafe_plain_python
        self._modules = {name: importlib.import_module(name) for name in self.allowed}
        warm_lazy_imports()
        # Packages above dotted names ("urllib" for "urllib.parse") get a holder view.
        self._packages = {
            name.rsplit(".", depth)[0]
            for name in self.allowed
            for depth in range(1, name.count(".") + 1)
        }

    def view(
        self, name: str, made: dict[str, types.ModuleType], tripwire: Tripwire
    ) -> types.ModuleType | None:
        """The view of `name` for one execution, made on first use and kept in `made`.

        None when `name` is not importable. A package holder shows only the allowed
        modules below it.
        """
        if name in made:
            return made[name]
        if name in self._modules:
            view = _module_view(self._modules[name], name, tripwire)
        elif name in self._packages:
            view = types.ModuleType(name)
        else:
            return None
        made[name] = view
        for child in (*self.allowed, *self._packages):
            parent, _, attr = child.rpartition(".")
            if parent == name:
                setattr(view, attr, self.view(child, made, tripwire))
        return view

    def fresh_views(self) -> dict[str, types.ModuleType]:
        """New views of every importable name."""
        made: dict[str, types.ModuleType] = {}
        for name in (*self.allowed, *self._packages):
            self.view(name, made, Tripwire())
        return made


def own_object(obj: Any) -> bool:
    """Whether `obj` is a class the connector defined or an instance of one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__module__ == CONNECTOR_MODULE and cls.__dict__.get("__module__") == CONNECTOR_MODULE


_super_self = vars(super)["__self__"].__get__  # past whatever a subclass of super defines
_super_self_class = vars(super)["__self_class__"].__get__
_super_this_class = vars(super)["__thisclass__"].__get__


_HELD = object()  # _definer's answer for a name the instance holds itself


def _definer(obj: Any, owner: Any, name: str) -> Any:
    """The class whose namespace `name` comes from when read on `obj` (a super object
    searches after its class); _HELD when the instance holds it itself; None when no
    class of the MRO has it (a metaclass's, or forwarded by a __getattr__)."""
    if isinstance(obj, super):
        mro = _super_self_class(obj).__mro__
        mro = mro[mro.index(_super_this_class(obj)) + 1 :]
    else:
        if not isinstance(owner, type) and name in getattr(owner, "__dict__", ()):
            return _HELD
        mro = (owner if isinstance(owner, type) else type(owner)).__mro__
    return next((cls for cls in mro if name in vars(cls)), None)


def _own_dict(obj: Any) -> dict[str, Any]:
    """The attributes of the connector's own instance: its dict itself when every class it
    derives from is its own (or object); else a copy without special names (a foreign
    base may keep shared objects there: staticmethod's `__annotations__`)."""
    held = vars(obj)
    if all(own_object(cls) or cls is object for cls in type(obj).__mro__):
        return held
    return {name: value for name, value in held.items() if not is_dunder(name)}


def _own_getattr(owner: Any) -> bool:
    """Whether `owner` is an instance whose class's first `__getattr__` is the connector's
    own (a class's `__getattr__` answers for its instances, not for the class)."""
    if isinstance(owner, type):
        return False
    found = next((c for c in type(owner).__mro__ if "__getattr__" in vars(c)), None)
    return found is not None and own_object(found)


def _described(obj: Any) -> str:
    if isinstance(obj, types.ModuleType | type):
        return f"{type(obj).__name__} {obj.__name__}"
    return f"a {type(obj).__name__} object"


def _is_decimal_context(obj: Any) -> bool:
    """A decimal.Context or its traps and flags: `getcontext().prec = 6` is ordinary, and
    each execution gets a fresh context (the worker resets it)."""
    decimal = sys.modules.get("decimal")
    return decimal is not None and (
        isinstance(obj, decimal.Context) or type(obj) is type(decimal.DefaultContext.traps)
    )


class _Formatter(string.Formatter):
    """str.format for connector code: fields read attributes and items through the guards."""

    def __init__(self, guards: Guards) -> None:
        self._guards = guards

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, Any]:
        first, rest = _string.formatter_field_name_split(field_name)
        obj = self.get_value(first, args, kwargs)
        for is_attribute, key in rest:
            obj = self._guards._getattr(obj, key) if is_attribute else obj[key]
        return obj, first


class _ReadOnly:
    """What a write to a module, a type or a foreign object meets: a recorded violation."""

    __slots__ = ("_description", "_guards")

    def __init__(self, guards: Guards, obj: Any) -> None:
        name = getattr(obj, "__name__", None) if isinstance(obj, types.ModuleType | type) else None
        kind = type(obj).__name__
        object.__setattr__(self, "_description", f"{kind} {name}" if name else f"a {kind} object")
        object.__setattr__(self, "_guards", guards)

    def _refuse(self, *_args: Any) -> None:
        raise self._guards.violation(f"connector code may not change {self._description}")

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _refuse


class Guards:
    """The globals one execution runs with: guarded builtins and a policy tripwire.

    Every violation is recorded even when the code catches the exception, so
    an execution that touched something forbidden always ends as
    `policy_violation`.
    """

    def __init__(self, imports: ImportPolicy, log: Callable[..., None], printer: type) -> None:
        self._tripwire = Tripwire()  # this execution's own: nothing trips it after the answer
        self.violations = self._tripwire.violations
        self._imports = imports
        self._views: dict[str, types.ModuleType] = {}  # made on import: fresh per execution
        self._log = log
        self._printer = printer

    def violation(self, message: str) -> PolicyError:
        """Record a violation and return the exception to raise."""
        return self._tripwire.trip(message)

    def _import(
        self,
        name: str,
        globals: Any = None,
        locals: Any = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> types.ModuleType:
        view = self._imports.view(name, self._views, self._tripwire) if level == 0 else None
        if view is None:
            raise self.violation(
                f"`{name}` is not importable in a connector; allowed modules are "
                f"{', '.join(self._imports.allowed)}; to allow more set CORRAL_ALLOWED_IMPORTS"
            )
        if fromlist:
            self._check_fromlist(name, view, fromlist)
            return view
        top = self._imports.view(name.split(".")[0], self._views, self._tripwire)
        assert top is not None  # the package above an importable name is importable
        return top

    def _check_fromlist(self, name: str, view: types.ModuleType, fromlist: Any) -> None:
        """Every name of `from name import ...` must be in the view.

        When a view lacks one, CPython's `from ... import` falls back on
        `sys.modules[f"{name}.{attr}"]` (for circular imports) and would hand
        over a real submodule the child happens to have loaded
        (`from urllib import request`): refuse here, before that can happen.
        """
        real = sys.modules.get(name)
        for attr in fromlist:
            if type(attr) is not str:
                raise self.violation(f"`from {name} import` needs plain str names")
            if attr in vars(view):
                continue
            if f"{name}.{attr}" in sys.modules or (real is not None and hasattr(real, attr)):
                raise self.violation(
                    f"`{name}.{attr}` is not available to connector code; {name} offers "
                    f"{', '.join(a for a in vars(view) if not a.startswith('_')) or 'nothing'}"
                )
            raise ImportError(f"cannot import name {attr!r} from {name!r}")

    def _checked_name(self, name: Any, action: str) -> str:
        """`name` as a plain str (a str subclass could lie about what it holds)."""
        if type(name) is not str:
            raise self.violation(f"{action} needs a plain str attribute name, not {type(name)!r}")
        if name in INSPECT_ATTRIBUTES or name.endswith("__roles__"):
            raise self.violation(f"{action} of {name!r}: the attribute is off limits")
        return name

    def _getattr(self, obj: Any, name: str, *default: Any) -> Any:
        name = self._checked_name(name, "getattr")
        if name.startswith("_"):
            return self._private(obj, name, *default)
        return self._guarded_value(getattr(obj, name, *default))

    def _private(self, obj: Any, name: str, *default: Any) -> Any:
        """An attribute starting with `_`: read only on the connector's own objects.

        A `super()` object counts as the object it is bound to. Special names are
        further limited to the methods a class may define and a few descriptive ones,
        and what an own class inherits from a foreign one comes only bound to the own
        object: `Own.__setattr__` (object's, unbound) would write any shared object.
        """
        if name in _DESCRIPTIVE:
            return getattr(obj, name, *default)
        owner = _super_self(obj) if isinstance(obj, super) else obj
        if name in _PUBLIC_UNDERSCORED and (
            isinstance(owner, tuple) or (isinstance(owner, type) and issubclass(owner, tuple))
        ):
            return getattr(obj, name, *default)
        if not own_object(owner):
            raise self.violation(
                f"`{name}` of {_described(owner)} is off limits: attributes starting with "
                "`_` are read only on the connector's own objects and classes"
            )
        if is_dunder(name) and (
            (name not in CLASS_METHODS and name not in _OWN_SPECIAL)
            or (name == "__class__" and isinstance(owner, type))
        ):
            raise self.violation(
                f"`{name}` is off limits; of the special attributes, connector code reads "
                "the methods a class may define and __name__, __qualname__, __doc__, "
                "__class__ (of an instance), __dict__, __module__"
            )
        if name == "__dict__":  # copies without special names: a class's would hold the
            if isinstance(owner, type):  # `__dict__` descriptor of its instances, usable on any
                return {k: v for k, v in vars(owner).items() if not is_dunder(k)}
            return _own_dict(owner)
        try:
            value = getattr(obj, name)
        except AttributeError:
            if default:  # `getattr(self, "_cache", None)`: lazily set, not there yet
                return default[0]
            raise
        if name in _OWN_SPECIAL:
            return value
        definer = _definer(obj, owner, name)
        if definer is _HELD or (definer is not None and own_object(definer)):
            return self._guarded_value(value)
        if definer is None:  # from a metaclass, or forwarded by a foreign __getattr__
            if _own_getattr(owner):
                return self._guarded_value(value)
            raise self.violation(
                f"`{name}` of {_described(owner)} comes from outside the connector's own "
                "classes: it is off limits"
            )
        if name == "__new__":  # makes a new object, changes none; not type.__new__
            return self._guarded_value(value)
        bound_to = getattr(value, "__self__", None)
        if bound_to is not owner and not (bound_to is type(owner) and own_object(bound_to)):
            raise self.violation(
                f"`{name}` comes from {definer.__name__}, not from the connector's own "
                f"classes: reach it through an instance (`self.{name}`, `super().{name}`)"
            )
        if name in ("__setattr__", "__delattr__"):
            return self._named(value, name.strip("_"))
        return value

    def _named(self, method: Callable[..., Any], action: str) -> Callable[..., Any]:
        """`method` (a bound __setattr__/__delattr__) refusing special names, as the
        `setattr` builtin does. A closure, not a partial: a partial shows its `func`."""

        def checked(name: Any, *value: Any) -> Any:
            return method(self._written_name(name, action), *value)

        return checked

    def _guarded_value(self, value: Any) -> Any:
        """What a read hands out, judged on the value, whatever route reached it (a
        subclass, `super()`, the class, a generic alias or a bound method forwarding the
        read to what is behind it).

        `str.format` walks attributes named in its format string, past every guard: the
        caller gets a format that reads attributes through `_getattr`. `mro()` hands out
        the classes a class derives from (Enum's class factory among them); `register` of
        an abstract base class would change what isinstance() answers for every later
        execution; `type.__new__` makes a class with any special method.
        """
        kind = type(value)
        if kind is types.BuiltinMethodType:
            owner, name = value.__self__, value.__name__
            if isinstance(owner, str) and name in ("format", "format_map"):
                return functools.partial(self._format, owner, map_only=name == "format_map")
            if isinstance(owner, type) and (name == "mro" or (name == "__new__" and owner is type)):
                raise self.violation(f"`{name}` of {_described(owner)} is off limits: {_WHY[name]}")
        elif kind is types.MethodType:  # ABCMeta.register is a Python method
            if value.__name__ == "register" and isinstance(value.__self__, abc.ABCMeta):
                raise self.violation(
                    f"`register` of {_described(value.__self__)} is off limits: {_WHY['register']}"
                )
        elif kind is types.MethodDescriptorType and (
            value is str.format or value is str.format_map
        ):
            return functools.partial(self._format, map_only=value is str.format_map)
        return value

    def _format(self, template: Any, /, *args: Any, map_only: bool = False, **kwargs: Any) -> str:
        if not isinstance(template, str):
            raise TypeError("format() needs a str to format")
        if map_only:
            if len(args) != 1 or kwargs:
                raise TypeError("format_map() takes exactly one mapping")
            return _Formatter(self).vformat(template, (), args[0])
        return _Formatter(self).vformat(template, args, kwargs)

    def _write(self, obj: Any) -> Any:
        """Writes reach containers and what the connector made (its classes and instances)."""
        if own_object(obj) or isinstance(obj, _WRITABLE) or _is_decimal_context(obj):
            return obj
        guarded = full_write_guard(obj)
        return obj if guarded is obj else _ReadOnly(self, obj)

    def _written_name(self, name: Any, action: str) -> str:
        name = self._checked_name(name, action)
        if is_dunder(name):
            raise self.violation(f"{action} of {name!r}: special attributes are Python's own")
        return name

    def _setattr(self, obj: Any, name: str, value: Any) -> None:
        setattr(self._write(obj), self._written_name(name, "setattr"), value)

    def _delattr(self, obj: Any, name: str) -> None:
        delattr(self._write(obj), self._written_name(name, "delattr"))

    def _hasattr(self, obj: Any, name: str) -> bool:
        try:
            self._getattr(obj, name)
        except AttributeError:
            return False
        return True

    def _type(self, *args: Any) -> type:
        """type(obj): the class of an object. Not the three-argument form (define classes
        with `class`), nor a class's metaclass (it makes classes), nor the class of
        corral's own objects other than exceptions (`http`, `context` are given, not made)."""
        if len(args) != 1:
            raise self.violation(
                "type() takes one argument in connector code (the object whose class you "
                "want); define a new class with a `class` statement"
            )
        cls = type(args[0])
        if issubclass(cls, types.GenericAlias | types.MethodType):
            raise self.violation(
                f"type() of a {cls.__name__} is off limits: it would make new ones that "
                "forward attribute reads to any object"
            )
        if issubclass(cls, type):
            raise self.violation("type() of a class is off limits: its metaclass makes classes")
        if cls.__module__.startswith("corral") and not issubclass(cls, BaseException):
            raise self.violation(f"type() of corral's own {cls.__name__} object is off limits")
        return cls

    def _vars(self, *args: Any) -> dict[str, Any]:
        """vars(obj) of the connector's own object; of anything else, its public names."""
        if len(args) != 1:
            raise self.violation("vars() needs the object whose attributes you want")
        (obj,) = args
        if own_object(obj) and not isinstance(obj, type):
            return _own_dict(obj)
        return {
            name: self._guarded_value(value)
            for name, value in vars(obj).items()
            if not name.startswith("_")
        }

    def _make_class(
        self, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any
    ) -> type:
        """Every `class` statement's metaclass. Making a class calls `__set_name__` on what
        its body holds: a foreign property from a module would be renamed for every later
        execution, so the class gets a copy; other foreign values with `__set_name__` are
        refused."""
        for key, value in list(namespace.items()):
            if type(value) is property:
                namespace[key] = property(value.fget, value.fset, value.fdel, value.__doc__)
            elif hasattr(type(value), "__set_name__") and not own_object(value):
                raise self.violation(
                    f"`{key}` holds a {type(value).__name__} the connector did not make: "
                    "a class body may not adopt it"
                )
        meta = types._calculate_meta(type, bases)  # type: ignore[attr-defined]
        return meta(name, bases, namespace, **kwargs)

    def _open(self, *_args: Any, **_kwargs: Any) -> None:
        raise self.violation("open() is refused: connector code has no file system")

    def globals(self) -> dict[str, Any]:
        """A fresh globals dict for one execution of compiled connector code."""
        if self._imports.unsafe_plain_python:
            return {"__builtins__": builtins, "__name__": CONNECTOR_MODULE, "log": self._log}
        allowed_builtins = dict(_BASE_BUILTINS)
        allowed_builtins.update(
            __import__=self._import,
            getattr=self._getattr,
            hasattr=self._hasattr,
            setattr=self._setattr,
            delattr=self._delattr,
            open=self._open,
            type=self._type,
            vars=self._vars,
        )
        return {
            "__builtins__": allowed_builtins,
            "__name__": CONNECTOR_MODULE,
            "__metaclass__": self._make_class,
            "_getattr_": self._getattr,
            "_getitem_": operator.getitem,
            "_getiter_": iter,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_write_": self._write,
            "_inplacevar_": lambda op, target, value: _INPLACE_OPERATORS[op](target, value),
            "_apply_": lambda func, *args, **kwargs: func(*args, **kwargs),
            "_print_": self._printer,
            "log": self._log,
        }
