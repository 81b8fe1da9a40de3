"""What one execution on a warm worker could leave for the next, and the reset after each.

Child side: standard library only. A worker runs many executions in one
interpreter, and the interpreter holds state longer than any one of them:
module-level and class-level containers (an enum's value-to-member map grows
when `re.I | re.M` builds a pseudo-member), functools caches, module globals
that functions rebind, and C-level tables (the codec search cache, the caches
of abstract base classes, `sys.modules`). Connector code cannot name most of
them, but allowed functions write them for it, and a later execution can read
what they hold, by presence or by timing.

`census()` enumerates them programmatically: every container bound at module
level or in a class's namespace of every loaded module, every module's
globals, the attribute dicts of module-level instances, and every functools
cache; `rebound_globals()` scans the code of every loaded function for
STORE_GLOBAL. REACHED names the modules allowed code runs in, and `RULES` says
for each structure what happens after an execution (emptied, restored,
rebound, the worker retired) or why nothing needs to; `tests/test_leftovers.py`
checks that the census in a running worker finds nothing the rules leave out.

The zygote calls `prepare()` once: the codec watch, `warm_up()` (what allowed
functions import or build on first use, done ahead), the census. A worker
takes its baseline when it starts; `reset()` after each execution is cheap
(~6 µs): one `len()` of each watched structure against the baseline, identity
checks of the rebindable globals, `_abc._reset_caches` of the reached ABCs, a
dirty flag for the codec cache. Snapshots are restored only when something
changed; a codec module a lookup imported is unloaded again; what has no way
back makes `reset()` say False, and the worker retires.
"""

from __future__ import annotations

import _abc
import abc
import array
import codecs
import collections
import dis
import enum
import fnmatch
import functools
import importlib
import operator
import re
import sys
import types
from collections.abc import Collection, Iterator, MutableMapping, MutableSequence, MutableSet
from typing import Any

#: What happens to a structure after every execution.
CLEAR = "clear"  # emptied (a cache: the next execution rebuilds what it needs)
RESTORE = "restore"  # put back to its baseline contents when its size changed
REBIND = "rebind"  # a global: bound back to its baseline value when it was rebound
RETIRE = "retire"  # no way back: a change retires the worker (the next execution gets a fresh one)
SKIP = "skip"  # not reset, for the reason given
_STRENGTH = {SKIP: 0, RETIRE: 1, REBIND: 2, RESTORE: 3, CLEAR: 4}

#: Modules whose code allowed connector code runs: the allowed modules and what they
#: call into, the builtins, and the guards, `log` and `http` it is handed. Containers
#: of any other module are not written by an execution (nothing it can call runs there).
REACHED: frozenset[str] = frozenset(
    """
    RestrictedPython RestrictedPython.Guards RestrictedPython.Limits RestrictedPython.Utilities
    RestrictedPython.PrintCollector RestrictedPython._compat RestrictedPython.transformer
    _abc _blake2 _codecs _collections _collections_abc _datetime _decimal _functools
    _hashlib _heapq _json _locale _md5 _operator _random _sha1 _sha256 _sha3 _sha512 _sre
    _string _strptime _struct _uuid _warnings _weakref _weakrefset abc base64 binascii
    bisect builtins calendar codecs collections collections.abc copyreg
    corral.config._imports corral.sandbox._child corral.sandbox._http
    corral.sandbox._leftovers corral.sandbox._policy corral.sandbox._protocol
    corral.sandbox._worker datetime decimal encodings encodings.aliases enum fractions
    functools hashlib heapq hmac html html.entities ipaddress itertools json json.decoder
    json.encoder json.scanner keyword linecache locale math numbers operator os random re
    re._casefix re._compiler re._constants re._parser reprlib statistics string stringprep
    sys textwrap time tracemalloc types unicodedata urllib urllib.parse uuid warnings weakref
    """.split()  # noqa: SIM905 - a table, one string
)

#: How each structure the census finds is handled, first match wins: (pattern over
#: "kind:module:name", action, why). Kinds: `module` (a container bound at module level),
#: `class` (a container in a class's namespace), `instance` (the attributes of an object
#: bound at module level), `globals` (a module's namespace), `lru` (a functools cache);
#: `state` names C-level state the census cannot see. After these rules: a container of
#: a module in REACHED is watched (RETIRE), of any other module skipped (NOT_REACHED).
RULES: tuple[tuple[str, str, str], ...] = (
    # --- C-level state, known by name (the census cannot see into C).
    ("state:codecs:search cache", RESTORE,
     "`b'x'.decode(name)` caches the codec found for `name`: a search function that marks "
     "the cache dirty stands in front of encodings.search_function; a dirty cache is "
     "emptied (codecs.unregister) and the baseline lookups are made again"),
    ("state:abc:caches", CLEAR,
     "isinstance()/issubclass() against an abstract base class cache the answer per class "
     "(a timing channel): every ABC's caches are emptied (_abc._reset_caches)"),
    ("state:sys:interned strings", SKIP,
     "sys.intern's table keeps no string alive (mortal interning on 3.11 and 3.13+): an "
     "interned string dies with its last holder, and every holder is on this list"),
    ("state:decimal:context", CLEAR, "the execution thread gets a fresh decimal.Context"),
    ("state:random:state", CLEAR, "random is reseeded (gauss_next with it)"),
    ("state:warnings:registries", CLEAR,
     "a warning shown once is noted in a module's `__warningregistry__`: "
     "warnings._filters_mutated() makes every registry stale"),
    # --- Caches written by allowed functions: emptied, or put back.
    ("lru:*", CLEAR, "a functools cache: cache_clear()"),
    ("module:re:_cache", CLEAR, "re's compiled patterns: emptied"),
    ("module:_strptime:_regex_cache", CLEAR, "time.strptime's compiled formats"),
    ("module:encodings:_cache", RESTORE, "encodings.search_function's cache, misses too"),
    ("module:encodings:_aliases", RESTORE, "codec modules may add aliases when found"),
    ("module:hashlib:__builtin_constructor_cache", RESTORE, "hashlib.new's fallback cache"),
    ("module:sys:modules", RETIRE,
     "a module imported during an execution (a timing channel, and its side effects): "
     "a codec module of `encodings` (plain Python, found by a name lookup) is unloaded "
     "again, so that the next execution imports it anew as a fresh worker would; anything "
     "else retires the worker; warm_up() imports ahead what allowed code imports lazily"),
    ("class:*._value2member_map_", RESTORE, "an enum's value map: Flag pseudo-members"),
    ("class:*._member_map_", SKIP, "an enum's members: written only when it is made"),
    ("class:*._member_names_", SKIP, "an enum's member names: written only when it is made"),
    ("class:*._unhashable_values_", SKIP, "written only when the enum is made"),
    ("class:ipaddress:*._netmask_cache", RESTORE, "ipaddress's netmask cache"),
    ("globals:*", SKIP,
     "a module's namespace gains a name only by a function's STORE_GLOBAL (REBOUND_GLOBALS: "
     "deleted again), an import (sys.modules grows: retired) or a warning's registry "
     "(state:warnings:registries)"),
    # --- The worker's own bookkeeping, or written only when a module or class is made.
    ("module:threading:*", SKIP, "threads: none can be started (RLIMIT_NPROC is 0)"),
    ("module:_weakrefset:*", SKIP, "weak sets of live objects; nothing connector-written"),
    ("module:linecache:cache", SKIP, "source lines: no allowed function reads a file"),
    ("module:sys:path_importer_cache", SKIP, "import finders: imports retire the worker"),
    ("*:__all__", SKIP, "a module's export list: written only by its own import"),
    ("*:__path__", SKIP, "a package's path: written only by its own import"),
    ("*.__annotations__", SKIP, "annotations: written only when the class is made"),
    ("*.__slots__", SKIP, "slots: read only when the class is made"),
    ("*._fields_", SKIP, "a ctypes structure's fields: read only when the class is made"),
    ("*._field_defaults", SKIP, "a namedtuple's defaults: connector code cannot read it"),
    ("*.__dataclass_fields__", SKIP, "a dataclass's fields: written only when it is made"),
    ("instance:*:__spec__", SKIP, "a module's import spec: written only by its import"),
    ("instance:*:__loader__", SKIP, "a module's loader: written only by its import"),
    ("instance:corral.sandbox._leftovers:WATCH", SKIP, "this reset itself"),
)  # fmt: skip
_MATCHERS = [(re.compile(fnmatch.translate(p)).match, a, w) for p, a, w in RULES]
NOT_REACHED = "the module is not in REACHED: no function connector code can call runs there"

#: Globals some function of a loaded module rebinds (STORE_GLOBAL/DELETE_GLOBAL), as
#: `rebound_globals()` finds them in a worker; the test keeps this list complete.
REBOUND_GLOBALS: tuple[str, ...] = (
    "_frozen_importlib._bootstrap_external", "_frozen_importlib._imp",
    "_frozen_importlib.sys", "_frozen_importlib_external._bootstrap", "_strptime._TimeRE_cache",
    "base64._a85chars", "base64._a85chars2", "base64._b85chars", "base64._b85chars2",
    "base64._b85dec", "certifi.core._CACERT_CTX", "certifi.core._CACERT_PATH",
    "corral.sandbox._leftovers.WATCH", "corral.sandbox._worker._process_baseline",
    "corral.sandbox._worker._settings_baseline", "io.OpenWrapper", "ipaddress._address_fmt_re",
    "locale._setlocale",
    "logging._logRecordFactory", "logging._loggerClass", "logging._warnings_showwarning",
    "platform._os_release_cache", "platform._uname_cache", "posixpath._varprog",
    "posixpath._varprogb", "shutil._USE_CP_SENDFILE", "site.ENABLE_USER_SITE",
    "site.USER_BASE", "site.USER_SITE", "tempfile._O_TMPFILE_WORKS",
    "tempfile._name_sequence", "tempfile.tempdir", "threading._SHUTTING_DOWN",
    "threading._active_limbo_lock", "threading._main_thread", "threading._profile_hook",
    "threading._shutdown_locks_lock", "threading._trace_hook", "tracemalloc._is_tracing",
    "urllib.parse._hextobyte", "urllib.parse._hostprog", "urllib.parse._portprog",
    "urllib.parse._typeprog", "uuid._last_timestamp", "uuid._node", "zipfile._crctable",
    "zipimport._importing_zlib", "warnings._filters_version",
)  # fmt: skip

_CONTAINERS = (
    dict, list, set, bytearray, collections.deque, array.array,
    MutableMapping, MutableSequence, MutableSet,
)  # fmt: skip
_CONCRETE = (dict, list, set, bytearray, collections.deque, array.array)
_LRU = functools._lru_cache_wrapper
_MISSING = object()
#: Module-level objects whose attributes are not state: classes, modules, functions
#: (their own census entries), and values (an enum member, re's named int constants).
_NOT_INSTANCES = (type, types.ModuleType, types.FunctionType, int, str, float, tuple, enum.Enum)
_filters_mutated = getattr(sys.modules.get("_warnings"), "_filters_mutated", lambda: None)
_HEAPTYPE = 1 << 9
_STORES = {dis.opmap["STORE_GLOBAL"], dis.opmap["DELETE_GLOBAL"]}
#: Modules that allowed functions import on first use (from C: time.strptime and
#: datetime.strptime import _strptime; from Python: see rebound_globals' sibling scan in
#: the tests). Imported ahead, so that no execution makes sys.modules grow.
LAZY_IMPORTS = (
    "_strptime", "unicodedata", "stringprep", "tracemalloc", "_md5", "_sha1", "_sha256",
    "_sha3", "_blake2", "_multibytecodec", "_codecs_cn", "_codecs_hk", "_codecs_iso2022",
    "_codecs_jp", "_codecs_kr", "_codecs_tw",
)  # fmt: skip


def _is_container(value: Any) -> bool:
    if isinstance(value, _CONCRETE):
        return True
    kind = type(value)  # a static type is a container only as one of _CONCRETE
    return bool(kind.__flags__ & _HEAPTYPE) and isinstance(value, _CONTAINERS)


def _classes() -> Iterator[type]:
    """Every class alive, from object down through __subclasses__()."""
    seen: set[int] = set()
    stack: list[type] = [object]
    while stack:
        cls = stack.pop()
        if id(cls) in seen:
            continue
        seen.add(id(cls))
        yield cls
        try:
            stack.extend(type.__subclasses__(cls))
        except TypeError:  # type itself
            stack.extend(type.__subclasses__(type))


def _modules() -> list[tuple[str, types.ModuleType]]:
    return sorted(
        (name, module)
        for name, module in list(sys.modules.items())
        if isinstance(module, types.ModuleType)
    )


def census(only: Collection[str] | None = None) -> dict[str, Any]:
    """Every mutable structure the interpreter holds beyond one execution (of the modules
    in `only`, when given): "kind:module:name" -> the object. C-level state, which has no
    object, is not included (see RULES)."""
    found: dict[str, Any] = {}
    for name, module in _modules():
        if only is not None and name not in only:
            continue
        namespace = vars(module)
        found[f"globals:{name}:"] = namespace
        for attr, value in list(namespace.items()):
            if _is_container(value):
                found[f"module:{name}:{attr}"] = value
            elif isinstance(value, _LRU):
                found[f"lru:{name}:{attr}"] = value
            elif type(value).__flags__ & _HEAPTYPE and not isinstance(value, _NOT_INSTANCES):
                try:
                    attrs = object.__getattribute__(value, "__dict__")
                except (AttributeError, TypeError):
                    continue
                if isinstance(attrs, dict) and attrs:
                    found[f"instance:{name}:{attr}"] = attrs
    for cls in _classes():
        if not cls.__flags__ & _HEAPTYPE:
            continue  # a static type's namespace is read-only
        if only is not None and cls.__module__ not in only:
            continue
        where = f"{cls.__module__}:{cls.__qualname__}"
        for attr, value in list(cls.__dict__.items()):
            if _is_container(value):
                found[f"class:{where}.{attr}"] = value
            elif isinstance(value, _LRU):
                found[f"lru:{where}.{attr}"] = value
    return found


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def rebound_globals() -> set[str]:
    """ "module.name" of every global that a loaded function stores or deletes (slow: tests)."""
    functions: list[types.FunctionType] = []
    for _, module in _modules():
        for value in list(vars(module).values()):
            if isinstance(value, types.FunctionType):
                functions.append(value)
            elif isinstance(value, type):
                for member in list(vars(value).values()):
                    member = getattr(member, "__func__", member)
                    if isinstance(member, types.FunctionType):
                        functions.append(member)
    found = set()
    for function in functions:
        for code in _codes(function.__code__):
            for instruction in dis.get_instructions(code):
                if instruction.opcode in _STORES:
                    found.add(f"{function.__module__}.{instruction.argval}")
    return found


def classify(name: str) -> tuple[str, str]:
    """The action and reason REACHED, then RULES give `name` ("kind:module:name")."""
    kind, module, _ = name.split(":", 2)
    if kind not in ("state", "globals") and module not in REACHED:
        return SKIP, NOT_REACHED
    for matches, action, why in _MATCHERS:
        if matches(name):
            return action, why
    if kind in ("module", "class", "instance"):
        return RETIRE, f"a {kind}-level container of a reached module: a change retires"
    raise LookupError(f"no rule for {name}")


def warm_up() -> None:
    """Import ahead what allowed functions import on first use, and build the tables
    they build on first use, so that no execution finds them missing (trusted code)."""
    import base64
    import time
    import urllib.parse

    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    for name in ("utf-8", "ascii", "latin-1", "utf-16", "utf-32", "idna"):
        codecs.lookup(name)  # the worker's own (a text file's) and json's, in the baseline
    time.strptime("2000", "%Y")
    base64.b85decode(base64.b85encode(b"x"))
    base64.a85decode(base64.a85encode(b"x"))
    urllib.parse.unquote_to_bytes("%41")
    for split in ("_splittype", "_splithost", "_splitport"):
        getattr(urllib.parse, split, str)("x://y:1/")


class Leftovers:
    """The structures of one interpreter and their reset after each execution."""

    def __init__(self) -> None:
        """Install the codec watch: from here on, codec lookups are noted (call this first:
        the lookups made before the baseline are the ones a reset makes again)."""
        self.codecs_dirty = False
        self._recording = True  # codec lookups before the baseline are re-made after a reset
        self._warm_codecs: list[str] = []
        self._install_codec_watch()
        self.structures: list[tuple[str, Any, str]] = []

    def cover(self, found: dict[str, Any]) -> None:
        """Classify what a census found (by RULES) and keep what the reset watches."""
        by_id: dict[int, tuple[str, Any, str]] = {}
        for name, obj in found.items():
            action, _ = classify(name)
            held = by_id.get(id(obj))
            if held is None or _STRENGTH[action] > _STRENGTH[held[2]]:
                by_id[id(obj)] = (name, obj, action)
        self.structures = sorted(by_id.values(), key=lambda entry: entry[0])
        self._lrus = [obj for _, obj, action in self.structures if isinstance(obj, _LRU)]
        self._clears = [obj for _, obj, action in self.structures
                        if action == CLEAR and not isinstance(obj, _LRU)]  # fmt: skip
        self._watched = [entry for entry in self.structures if entry[2] in (RESTORE, RETIRE)]
        self._abcs = [
            cls for cls in _classes()
            if isinstance(cls, abc.ABCMeta) and cls.__module__ in REACHED
        ]  # fmt: skip
        self._globals: list[tuple[dict[str, Any], str]] = []
        self.rebound: list[str] = []  # the rebindable globals checked (of reached modules)
        for dotted in REBOUND_GLOBALS:
            module, _, attr = dotted.rpartition(".")
            if module in sys.modules and module in REACHED:
                self._globals.append((vars(sys.modules[module]), attr))
                self.rebound.append(dotted)

    def names(self) -> set[str]:
        """Every structure this reset covers, "kind:name" (one name per object)."""
        return {name for name, _, action in self.structures if action != SKIP}

    def _install_codec_watch(self) -> None:
        import encodings

        search = encodings.search_function

        def search_function(encoding: str) -> Any:
            """encodings.search_function, noting that the codec cache changes."""
            if self._recording:
                self._warm_codecs.append(encoding)
            else:
                self.codecs_dirty = True
            return search(encoding)

        codecs.unregister(search)  # and the C-level cache with it
        codecs.register(search_function)
        self._search = search_function

    def baseline(self) -> None:
        """Take what is held now as what every execution starts from."""
        self._recording = False
        self.codecs_dirty = False
        for cls in self._abcs:
            _abc._reset_caches(cls)
        self._objects = [obj for _, obj, _ in self._watched]
        self._module_names = frozenset(sys.modules)
        self._sizes = list(map(len, self._objects))
        self._snapshots = {
            id(obj): _copy(obj) for _, obj, action in self._watched if action == RESTORE
        }
        self._missing = [_MISSING] * len(self._globals)
        self._global_dicts = [namespace for namespace, _ in self._globals]
        self._global_names = [attr for _, attr in self._globals]
        self._global_values = list(
            map(dict.get, self._global_dicts, self._global_names, [_MISSING] * len(self._globals))
        )

    def reset(self) -> bool:
        """Put everything back as the baseline had it; False when the worker must retire."""
        for cache in self._lrus:
            cache.cache_clear()
        for container in self._clears:
            container.clear()
        for cls in self._abcs:
            _abc._reset_caches(cls)
        whole = True
        if list(map(len, self._objects)) != self._sizes:
            whole = self._restore()
        if self.codecs_dirty:
            self._reset_codecs()
        _filters_mutated()  # every warnings registry is stale: a warning shows again
        values = map(dict.get, self._global_dicts, self._global_names, self._missing)
        if not all(map(operator.is_, values, self._global_values)):
            self._rebind()
        return whole

    def _rebind(self) -> None:
        """Bind every checked global back to its baseline value (or remove a new one)."""
        for namespace, attr, value in zip(
            self._global_dicts, self._global_names, self._global_values, strict=True
        ):
            if value is _MISSING:
                namespace.pop(attr, None)
            else:
                namespace[attr] = value

    def changed(self) -> list[str]:
        """The watched structures whose size differs from the baseline (for tests)."""
        return [
            name for (name, obj, _), size in zip(self._watched, self._sizes, strict=True)
            if len(obj) != size
        ]  # fmt: skip

    def _restore(self) -> bool:
        """Put back what changed size; False when something has no way back."""
        whole = True
        for (_, obj, action), size in zip(self._watched, self._sizes, strict=True):
            if len(obj) == size:
                continue
            if obj is sys.modules:
                self._unload_codec_modules()
                whole = whole and len(obj) == size
                continue
            snapshot = self._snapshots.get(id(obj))
            if action == RESTORE and snapshot is not None:
                _put_back(obj, snapshot)
            else:
                whole = False
        return whole

    def _unload_codec_modules(self) -> None:
        """Remove the codec modules a lookup imported (its codec cache entries go with the
        codec reset); what else an execution imported stays, and the worker retires."""
        import encodings

        for name in [name for name in sys.modules if name not in self._module_names]:
            module = sys.modules[name]
            package, _, attr = name.rpartition(".")
            if package != "encodings" or not str(getattr(module, "__file__", "")).endswith(".py"):
                continue
            del sys.modules[name]
            if vars(encodings).get(attr) is module:
                delattr(encodings, attr)

    def _reset_codecs(self) -> None:
        codecs.unregister(self._search)  # empties the C-level cache
        codecs.register(self._search)
        import encodings

        _put_back(encodings._cache, self._snapshots[id(encodings._cache)])
        for name in dict.fromkeys(self._warm_codecs):
            codecs.lookup(name)
        self.codecs_dirty = False


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    if isinstance(obj, set):
        return set(obj)
    return None


def _put_back(obj: Any, snapshot: Any) -> None:
    if isinstance(obj, list):
        obj[:] = snapshot
    else:
        obj.clear()
        obj.update(snapshot)


#: The interpreter's Leftovers, made by prepare() in the zygote (None before).
WATCH: Leftovers | None = None


def prepare() -> Leftovers:
    """Warm up, take the census and install the codec watch (in the zygote, once); a
    worker takes its baseline when it starts serving."""
    global WATCH
    watch = Leftovers()
    warm_up()
    watch.cover(census(REACHED))
    WATCH = watch
    return watch


def reset() -> bool:
    """After an execution: reset everything; False when the worker must retire."""
    return WATCH is None or WATCH.reset()


def uncovered(found: dict[str, Any] | None = None) -> dict[str, str]:
    """What a census (of every loaded module) finds that neither the running reset covers
    nor a rule skips with a reason: name -> what is missing."""
    found = census() if found is None else found
    covered_ids = {id(obj) for _, obj, action in (WATCH.structures if WATCH else ())
                   if action != SKIP}  # fmt: skip
    out: dict[str, str] = {}
    for name, obj in found.items():
        try:
            action, _ = classify(name)
        except LookupError:
            out[name] = "no rule"
            continue
        if action == SKIP:
            continue
        if id(obj) not in covered_ids:
            out[name] = f"{action}: not covered by the running reset"
    return out
