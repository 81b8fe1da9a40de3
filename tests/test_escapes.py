"""Adversarial corpus: known ways out of Python sandboxes, each tried on both backends.

Every case is a payload that, if the technique worked, would produce evidence only
an escape can produce:

- `LEAK`: the names of the child's `sys.modules` ("corral.sandbox._child" among
  them), reached through `sys`, `os`, a host function's globals or a host frame;
- `FILE`: the child's `/proc/self/status` ("NoNewPrivs" in it), read through
  `open`, `io`, `posix` or a module loader;
- `TAMPER`: "TAMPERED", logged once a shared object (a module, a class, the
  builtins, the decimal context) was changed; these cases also run a clean
  execution afterwards that must see the object intact (the same worker serves it).

Payloads log the evidence before returning it, so an escape that is only caught
later (a tripwire recorded after the fact) still shows in the logs. A case passes
when the execution is refused with its documented error type and no evidence
reached the output, the logs or the error message.

`test_payload_escapes_without_the_language_layer` runs the same payloads with the
language layer switched off (a test-only switch, see test_os_layers.py) and checks
that they then do produce their evidence: no case can pass merely because its
payload was broken.

The filesystem the child sees is not the host's (test_os_layers.py), so a canary
file on the host could not be written even by an escape: evidence travels back
through the output and the logs instead.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass
from typing import Any

import pytest

import corral
from corral import Limits, NodeSandbox
from corral.config import DEFAULT_ALLOWED_IMPORTS, load_settings
from corral.sandbox._policy import Guards, ImportPolicy, PolicyError, compile_connector

LEAK = "corral.sandbox._child"  # a key of the child's sys.modules
FILE = "NoNewPrivs"  # a line of the child's /proc/self/status
TAMPER = "TAMPERED"
EVIDENCE = (LEAK, FILE, TAMPER)

LIMITS = Limits(max_memory_mb=64, max_cpu_ms=2_000)
TIMEOUT_MS = 3_000


@dataclass(frozen=True)
class Case:
    """A payload, the error type that must refuse it, and the evidence an escape would give.

    `plain`: the payload escapes (produces `evidence`) when the language layer is off;
    False only where the technique can show nothing on this interpreter whatever the policy
    (a source given as str ignores its coding cookie, built-in types refuse new attributes,
    breakpoint() has no stdin to read).
    `after`: a clean execution run next, in the same sandbox, and the output it must give.
    """

    code: str
    expect: tuple[str, ...] = ("policy_violation",)
    evidence: str = LEAK
    plain: bool = True
    after: tuple[str, Any] | None = None


def case(
    id: str,
    code: str,
    expect: str | tuple[str, ...] = "policy_violation",
    evidence: str = LEAK,
    plain: bool = True,
    after: tuple[str, Any] | None = None,
) -> Any:
    expected = (expect,) if isinstance(expect, str) else expect
    body = textwrap.dedent(code).lstrip("\n")
    return pytest.param(Case(body, expected, evidence, plain, after), id=id)


# ---------------------------------------------------------------------------------------------
# Building blocks the payloads share. Each family reaches the host its own way; what it does
# once there is the same: list sys.modules.

#: From a frame of connector code, up to the first host frame (corral.sandbox._child).
FRAME_WALK = """
def host_modules(frame):
    while frame.f_globals['__name__'] == 'connector':
        frame = frame.f_back
    return list(frame.f_globals['sys'].modules)
"""

#: From `object`, to os._wrap_close and the os module's globals.
SUBCLASS_WALK = """
def host_modules(base):
    for sub in base.__subclasses__():
        if sub.__name__ == '_wrap_close':
            return list(sub.__init__.__globals__['sys'].modules)
"""


def getter_walk(setup: str, get: str = "getattr(obj, N(name))") -> str:
    """The subclass walk with every dunder read through `get` (a computed-name getattr).

    `setup` defines N (turns a name into what is passed) and anything `get` needs.
    """
    return (
        textwrap.dedent(setup).strip()
        + f"""
def get(obj, name):
    return {get}
def run(params, context):
    base = get(get((), '__cl' + 'ass__'), '__mr' + 'o__')[-1]
    for sub in get(base, '__subcl' + 'asses__')():
        if get(sub, '__na' + 'me__') == '_wrap_close':
            found = list(get(get(sub, '__in' + 'it__'), '__glo' + 'bals__')['sys'].modules)
            log(found)
            return found
"""
    )


def tamper(
    module: str, attempt: str, check: str, after: tuple[str, Any], swallow: bool = True
) -> dict[str, Any]:
    """A payload that tries `attempt`, then logs TAMPERED if `check` holds.

    With `swallow`, the attempt's errors are caught (a refusal must count all the same).
    """
    body = textwrap.dedent(attempt).strip()
    if swallow:
        body = f"try:\n{textwrap.indent(body, '    ')}\nexcept Exception:\n    pass"
    code = f"""
import {module}
def run(params, context):
{textwrap.indent(body, " " * 4)}
    if {check}:
        log('TAMPERED')
        return 'TAMPERED'
"""
    after_code = f"import {module}\ndef run(params, context):\n    return {after[0]}\n"
    return {"code": code, "evidence": TAMPER, "after": (after_code, after[1])}


JSON_INTACT = ("json.loads('1')", 1)


def fullwidth(code: str, *words: str) -> str:
    """`code` with `words` spelt in fullwidth letters (and underscores, past the first)."""

    def widen(word: str) -> str:
        lead = len(word) - len(word.lstrip("_"))
        return word[:lead] + "".join(
            chr(ord(c) + 0xFEE0) if c.isalpha() or c == "_" else c for c in word[lead:]
        )

    for word in words:
        code = code.replace(word, widen(word))
    return code


# ---------------------------------------------------------------------------------------------
# The corpus.

# fmt: off
FRAMES = [
    case("generator-gi_frame-f_back", FRAME_WALK + """
def run(params, context):
    def gen():
        yield host_modules(g.gi_frame)
    g = gen()
    found = next(g)
    log(found)
    return found
"""),
    case("generator-send-itself-then-gi_frame", FRAME_WALK + """
def run(params, context):
    def gen():
        me = yield
        yield host_modules(me.gi_frame)
    g = gen()
    next(g)
    found = g.send(g)
    log(found)
    return found
"""),
    case("generator-throw-then-tb_frame", FRAME_WALK + """
def run(params, context):
    def gen():
        try:
            yield 1
        except ValueError as exc:
            yield host_modules(exc.__traceback__.tb_frame)
    g = gen()
    next(g)
    found = g.throw(ValueError('in'))
    log(found)
    return found
"""),
    case("generator-expression-gi_frame", FRAME_WALK + """
def run(params, context):
    ge = (host_modules(ge.gi_frame) for _ in [0])
    found = next(ge)
    log(found)
    return found
"""),
    case("generator-gi_yieldfrom-builtins", """
def run(params, context):
    def inner():
        yield 1
    def middle():
        yield from inner()
    outer = middle()
    next(outer)
    frame = outer.gi_yieldfrom.gi_frame
    found = list(frame.f_builtins['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("generator-frame-via-computed-getattr", """
def run(params, context):
    def gen():
        frame = getattr(g, 'gi_' + 'frame')
        while getattr(frame, 'f_' + 'globals')['__name__'] == 'connector':
            frame = getattr(frame, 'f_' + 'back')
        yield list(getattr(frame, 'f_' + 'globals')['sys'].modules)
    g = gen()
    found = next(g)
    log(found)
    return found
"""),
    case("traceback-tb_frame", FRAME_WALK + """
def run(params, context):
    try:
        1 / 0
    except ZeroDivisionError as exc:
        found = host_modules(exc.__traceback__.tb_frame)
    log(found)
    return found
"""),
    case("traceback-tb_next-chain", FRAME_WALK + """
def fail():
    raise KeyError('x')
def run(params, context):
    try:
        fail()
    except KeyError as exc:
        found = host_modules(exc.__traceback__.tb_next.tb_frame)
    log(found)
    return found
"""),
    case("exception-__context__-traceback", FRAME_WALK + """
def run(params, context):
    try:
        try:
            1 / 0
        except ZeroDivisionError:
            raise ValueError('second')
    except ValueError as exc:
        found = host_modules(exc.__context__.__traceback__.tb_frame)
    log(found)
    return found
"""),
    case("exception-__cause__-traceback", FRAME_WALK + """
def run(params, context):
    try:
        try:
            [][1]
        except IndexError as first:
            raise ValueError('second') from first
    except ValueError as exc:
        found = host_modules(exc.__cause__.__traceback__.tb_frame)
    log(found)
    return found
"""),
    case("traceback-via-computed-getattr", """
def run(params, context):
    try:
        1 / 0
    except ZeroDivisionError as exc:
        frame = getattr(getattr(exc, '__trace' + 'back__'), 'tb_' + 'frame')
    while getattr(frame, 'f_' + 'globals')['__name__'] == 'connector':
        frame = getattr(frame, 'f_' + 'back')
    found = list(getattr(frame, 'f_' + 'globals')['sys'].modules)
    log(found)
    return found
"""),
    case("except-star-exception-group-traceback", FRAME_WALK + """
def run(params, context):
    try:
        try:
            raise ValueError('v')
        except ValueError as leaf:
            raise ExceptionGroup('g', [leaf])
    except* ValueError as group:
        found = host_modules(group.exceptions[0].__traceback__.tb_frame)
    log(found)
    return found
"""),
    case("coroutine-cr_frame", FRAME_WALK + """
def run(params, context):
    async def coro():
        return host_modules(c.cr_frame)
    c = coro()
    try:
        c.send(None)
    except StopIteration as done:
        found = done.value
    log(found)
    return found
"""),
    case("coroutine-cr_await-builtins", """
class Pause:
    def __await__(self):
        yield
async def inner():
    await Pause()
async def outer():
    await inner()
def run(params, context):
    c = outer()
    c.send(None)
    frame = c.cr_await.cr_frame
    found = list(frame.f_builtins['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("async-generator-ag_frame-builtins", """
def run(params, context):
    async def agen():
        yield 1
    a = agen()
    found = list(a.ag_frame.f_builtins['__import__']('sys').modules)
    log(found)
    return found
"""),
]

SUBCLASSES = [
    case("tuple-class-bases-subclasses", SUBCLASS_WALK + """
def run(params, context):
    found = host_modules(().__class__.__bases__[0])
    log(found)
    return found
"""),
    case("str-class-mro-subclasses", SUBCLASS_WALK + """
def run(params, context):
    found = host_modules(''.__class__.__mro__[-1])
    log(found)
    return found
"""),
    case("getattr-concatenated-names", getter_walk("N = str")),
    case("getattr-str-subclass-names", getter_walk("class N(str):\n    pass")),
    case("getattr-bytes-decoded-names", getter_walk(
        "def N(s):\n    return bytes(s, 'ascii').decode()")),
    case("getattr-chr-built-names", getter_walk(
        "def N(s):\n    return ''.join(chr(ord(c)) for c in s)")),
    case("getattr-format-built-names", getter_walk("def N(s):\n    return format(s, 's')")),
    case("getattr-percent-built-names", getter_walk("def N(s):\n    return '%s' % (s,)")),
    case("getattr-with-default", getter_walk("N = str", "getattr(obj, name, None)")),
    case("hasattr-then-getattr", getter_walk(
        "N = str", "getattr(obj, name) if hasattr(obj, name) else None")),
    case("map-getattr", getter_walk("N = str", "list(map(getattr, [obj], [name]))[0]")),
    case("functools-reduce-getattr", getter_walk(
        "import functools", "functools.reduce(getattr, [name], obj)")),
    case("functools-partial-getattr", getter_walk(
        "import functools", "functools.partial(getattr, obj)(name)")),
    case("operator-attrgetter", getter_walk("import operator", "operator.attrgetter(name)(obj)")),
    case("caught-violations-still-count", getter_walk("N = str", "catching(obj, name)").replace(
        "def get(", "def catching(obj, name):\n    try:\n        return getattr(obj, name)\n"
        "    except Exception:\n        return None\ndef get(", 1)),
    case("object-__getattribute__", SUBCLASS_WALK + """
def run(params, context):
    cls = object.__getattribute__((), '__class__')
    found = host_modules(cls.__mro__[-1])
    log(found)
    return found
"""),
    case("super-proxy-globals", """
import json
class Enc(json.JSONEncoder):
    def leak(self):
        return list(super().encode.__globals__['__builtins__']['__import__']('sys').modules)
def run(params, context):
    found = Enc().leak()
    log(found)
    return found
"""),
    case("__init_subclass__-hook", SUBCLASS_WALK + """
class Base:
    def __init_subclass__(cls, **kwargs):
        log(host_modules(cls.__mro__[-1]))
class Sub(Base):
    pass
def run(params, context):
    return 'defined'
"""),
    case("__class_getitem__-hook", SUBCLASS_WALK + """
class Box:
    def __class_getitem__(cls, item):
        return host_modules(cls.__mro__[-1])
def run(params, context):
    found = Box[0]
    log(found)
    return found
"""),
    case("__set_name__-hook", SUBCLASS_WALK + """
class Field:
    def __set_name__(self, owner, name):
        log(host_modules(owner.__mro__[-1]))
class Model:
    field = Field()
def run(params, context):
    return 'defined'
"""),
    case("decorator-runs-at-definition", """
def steal(func):
    host = func.__globals__['log'].__globals__
    log(list(host['sys'].modules))
    return func
@steal
def run(params, context):
    return 'decorated'
"""),
    case("property-descriptor", getter_walk("N = str").replace(
        "def run(params, context):\n",
        "class Holder:\n    value = property(lambda self: leak())\ndef run(params, context):\n"
        "    return Holder().value\ndef leak():\n", 1)),
    case("type-three-arg-metaclass", """
def leak(cls):
    base = getattr(getattr(cls, '__mr' + 'o__')[-1], '__subcl' + 'asses__')
    for sub in base():
        if getattr(sub, '__na' + 'me__') == '_wrap_close':
            init = getattr(getattr(sub, '__in' + 'it__'), '__glo' + 'bals__')
            return list(init['sys'].modules)
def run(params, context):
    Meta = type('Meta', (type,), {})
    Leaky = Meta('Leaky', (), {})
    found = leak(Leaky)
    log(found)
    return found
"""),
    case("metaclass-keyword", SUBCLASS_WALK + """
class Meta(type):
    def __call__(cls):
        return host_modules(cls.__mro__[-1])
class Target(metaclass=Meta):
    pass
def run(params, context):
    found = Target()
    log(found)
    return found
"""),
    case("__class__-assignment-retypes-shared-object", **tamper(
        "uuid",
        """
        class Mine(uuid.UUID):
            __slots__ = ()
        object.__setattr__(uuid.NAMESPACE_DNS, '__class__', Mine)
        """,
        "not repr(uuid.NAMESPACE_DNS).startswith('UUID(')",
        ("repr(uuid.NAMESPACE_DNS)[:5]", "UUID("),
    )),
]

FORMATS = [
    case("str-format-attribute-walk", """
def run(params, context):
    found = '{0.__globals__[sys].modules}'.format(log)
    log(found)
    return found
"""),
    case("str-format_map", """
def run(params, context):
    found = '{f.__globals__[sys].modules}'.format_map({'f': log})
    log(found)
    return found
"""),
    case("str-format-unbound", """
def run(params, context):
    found = str.format('{0.__globals__[sys].modules}', log)
    log(found)
    return found
"""),
    case("str-format-via-getattr", """
def run(params, context):
    found = getattr('{0.__globals__[sys].modules}', 'format')(log)
    log(found)
    return found
"""),
    case("str-subclass-format", """
class Template(str):
    pass
def run(params, context):
    found = Template('{0.__globals__[sys].modules}').format(log)
    log(found)
    return found
"""),
    case("string-Formatter-get_field", """
import string
def run(params, context):
    found = list(string.Formatter().get_field('0.__globals__', [log], {})[0]['sys'].modules)
    log(found)
    return found
"""),
    case("string-Formatter-vformat", """
import string
def run(params, context):
    found = string.Formatter().vformat('{0.__globals__[sys].modules}', [log], {})
    log(found)
    return found
"""),
    case("str-format-on-print-object", """
def run(params, context):
    found = '{0.__self__.__loader__.find_spec.__globals__[sys].modules}'.format(print)
    log(found)
    return found
"""),
    case("str-format-generator-frame", """
def run(params, context):
    def gen():
        yield '{0.gi_frame.f_back.f_back.f_globals[sys].modules}'.format(g)
    g = gen()
    found = next(g)
    log(found)
    return found
"""),
    case("f-string-repr-of-subclasses", """
def run(params, context):
    found = f'{().__class__.__base__.__subclasses__()!r}'
    log(found)
    return found
"""),
    case("f-string-globals", """
def run(params, context):
    found = f"{list(log.__globals__['sys'].modules)!r}"
    log(found)
    return found
"""),
    case("percent-format-of-getattr", """
def run(params, context):
    found = '%s' % (list(getattr(log, '__glob' + 'als__')['sys'].modules),)
    log(found)
    return found
"""),
]

MODULE_WALKS = [
    case("uuid.os", """
import uuid
def run(params, context):
    found = list(uuid.os.sys.modules)
    log(found)
    return found
"""),
    case("uuid.sys", """
import uuid
def run(params, context):
    found = list(uuid.sys.modules)
    log(found)
    return found
"""),
    case("json.codecs", """
import json
def run(params, context):
    found = list(json.codecs.sys.modules)
    log(found)
    return found
"""),
    case("json.decoder-submodule", """
import json
def run(params, context):
    found = list(json.decoder.re.enum.sys.modules)
    log(found)
    return found
"""),
    case("collections._sys", """
import collections
def run(params, context):
    found = list(collections._sys.modules)
    log(found)
    return found
"""),
    case("collections._sys-via-getattr", """
import collections
def run(params, context):
    found = list(getattr(collections, '_sys').modules)
    log(found)
    return found
"""),
    case("hashlib.__builtins__", """
import hashlib
def run(params, context):
    found = list(hashlib.__builtins__['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("datetime.sys", """
import datetime
def run(params, context):
    found = list(datetime.sys.modules)
    log(found)
    return found
"""),
    case("decimal.__spec__-loader-reads-files", """
import decimal
def run(params, context):
    found = decimal.__spec__.loader.get_data('/proc/self/status').decode()
    log(found)
    return found
""", evidence=FILE),
    case("re.enum.sys", """
import re
def run(params, context):
    found = list(re.enum.sys.modules)
    log(found)
    return found
"""),
    case("re._compiler-loader-reads-files", """
import re
def run(params, context):
    found = re._compiler.__loader__.get_data('/proc/self/status').decode()
    log(found)
    return found
""", evidence=FILE),
    case("functools-function-__globals__", """
import functools
def run(params, context):
    host = functools.total_ordering.__globals__['__builtins__']
    found = list(host['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("base64.re", """
import base64
def run(params, context):
    found = list(base64.re.enum.sys.modules)
    log(found)
    return found
"""),
    case("urllib.parse.sys", """
import urllib.parse
def run(params, context):
    found = list(urllib.parse.sys.modules)
    log(found)
    return found
"""),
    case("itertools.__loader__", """
import itertools
def run(params, context):
    found = list(itertools.__loader__.find_spec.__globals__['sys'].modules)
    log(found)
    return found
"""),
    case("random._os", """
import random
def run(params, context):
    found = list(random._os.sys.modules)
    log(found)
    return found
"""),
    case("from-uuid-import-os", """
from uuid import os
def run(params, context):
    found = list(os.sys.modules)
    log(found)
    return found
"""),
    # A view lacks `request`: CPython's `from ... import` then looks in sys.modules for
    # urllib.request. Refused whether or not the child has it loaded (see
    # test_from_import_never_falls_back_on_sys_modules, which loads it).
    case("from-urllib-import-request", """
from urllib import request
def run(params, context):
    found = list(request.sys.modules)
    log(found)
    return found
""", expect=("policy_violation", "code_error")),
    case("module-view-__dict__", """
import json
def run(params, context):
    found = list(json.__dict__['__builtins__']['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("vars-of-module", """
import json
def run(params, context):
    found = list(vars(json)['__builtins__']['__import__']('sys').modules)
    log(found)
    return found
""", expect="code_error"),
    case("dir-of-module", """
import json
def run(params, context):
    for name in dir(json):
        if name == 'codecs':
            found = list(getattr(json, name).sys.modules)
            log(found)
            return found
    raise LookupError('dir() shows only what the view offers')
""", expect="code_error"),
    case("log-function-globals", """
def run(params, context):
    found = list(log.__globals__['sys'].modules)
    log(found)
    return found
"""),
    case("log-function-globals-via-getattr", """
def run(params, context):
    found = list(getattr(log, '__glob' + 'als__')['sys'].modules)
    log(found)
    return found
"""),
    case("print-builtin-__self__", """
def run(params, context):
    found = list(getattr(print, '__se' + 'lf__').__import__('sys').modules)
    log(found)
    return found
"""),
    case("http-capability-closure", """
def run(params, context):
    send = getattr(http, '_se' + 'nd')
    found = list(getattr(send, '__glo' + 'bals__')['os'].sys.modules)
    log(found)
    return found
"""),
    case("json-decoder-public-function-globals", """
import json
def run(params, context):
    hook = json.JSONDecoder().parse_object
    found = list(hook.__globals__['__builtins__']['__import__']('sys').modules)
    log(found)
    return found
"""),
]

WRITES = [
    case("assign-module-view-attribute", **tamper(
        "json", "json.loads = lambda s: 'TAMPERED'", "json.loads('1') == 'TAMPERED'", JSON_INTACT,
    )),
    case("setattr-module-view", **tamper(
        "json", "setattr(json, 'loads', lambda s: 'TAMPERED')", "json.loads('1') == 'TAMPERED'",
        JSON_INTACT,
    )),
    case("dict-__setitem__-on-module-view", **tamper(
        "json", "dict.__setitem__(json.__dict__, 'loads', lambda s: 'TAMPERED')",
        "json.loads('1') == 'TAMPERED'", JSON_INTACT,
    )),
    case("vars-item-assignment-on-module-view", **tamper(
        "json",
        "vars(json)['loads'] = lambda s: 'TAMPERED'\n"
        "assert json.loads('1') == 'TAMPERED', 'vars() gave a copy'",
        "json.loads('1') == 'TAMPERED'", JSON_INTACT, swallow=False,
    ), expect="code_error"),
    case("object-__setattr__-on-module-view", **tamper(
        "json", "object.__setattr__(json, 'loads', lambda s: 'TAMPERED')",
        "json.loads('1') == 'TAMPERED'", JSON_INTACT,
    )),
    # Put back before the answer: the child's own frames to the host are JSON.
    case("shared-class-attribute", """
import json
def restore(module):
    try:
        module.JSONEncoder.item_separator = ', '
    except Exception:
        pass
def run(params, context):
    try:
        json.JSONEncoder.item_separator = '!'
    except Exception:
        pass
    if [json.dumps([1, 2]) == '[1!2]', restore(json)][0]:
        log('TAMPERED')
        return 'TAMPERED'
""", evidence=TAMPER, after=(
        "import json\ndef run(p, c):\n    return json.dumps([1, 2])\n", "[1, 2]")),
    case("shared-class-property-replaced", **tamper(
        "uuid", "setattr(uuid.UUID, 'hex', 'TAMPERED')", "uuid.NAMESPACE_DNS.hex == 'TAMPERED'",
        ("uuid.NAMESPACE_DNS.hex", "6ba7b8109dad11d180b400c04fd430c8"),
    )),
    # The check puts len back: the child itself needs it to answer.
    case("builtins-dict-mutation", **tamper(
        "json",
        """
        table = __builtins__ if isinstance(__builtins__, dict) else vars(__builtins__)
        table['len'] = lambda obj, real=table['len']: 'TAMPERED' if obj == [] else real(obj)
        """,
        "len([]) == 'TAMPERED'", ("len([1])", 1),
    )),
    # ABCs are shared by every execution of a worker; the mro() of a view's class reaches
    # collections.abc, and register() would change isinstance() (so library behaviour:
    # Counter(list) treats a registered list as a mapping) for every later execution.
    case("abc-register-through-mro", **tamper(
        "collections", "collections.ChainMap.mro()[1].register(list)",
        "isinstance([], collections.ChainMap.mro()[2])",
        ("dict(collections.Counter(['a', 'b', 'a']))", {"a": 2, "b": 1}),
    )),
    case("abc-register-view-class", **tamper(
        "collections", "collections.ChainMap.register(dict)",
        "isinstance({}, collections.ChainMap)",
        ("isinstance({}, collections.ChainMap)", False),
    )),
    case("abc-register-via-getattr", **tamper(
        "collections", "getattr(collections.ChainMap.mro()[2], 'reg' + 'ister')(str)",
        "isinstance('', collections.ChainMap.mro()[2])",
        ("dict(collections.Counter('aba'))", {"a": 2, "b": 1}),  # (no mro(): it may be refused)
    )),
    # CPython refuses both writes on its own (built-in types are immutable): what counts
    # here is that asking is a policy violation.
    case("assign-builtin-type-method", **tamper(
        "json",
        """
        str.format = lambda *args: 'TAMPERED'
        str.upper = lambda self: 'TAMPERED'
        """,
        "'x'.upper() == 'TAMPERED'", ("'x'.upper()", "X"),
    ), plain=False),
]

GUARD_NAMES = [
    case("rebind-_write_-at-module-level", """
import json
_write_ = lambda obj: obj
def run(params, context):
    json.loads = lambda s: 'TAMPERED'
    log(json.loads('1'))
    return json.loads('1')
""", evidence=TAMPER, after=("import json\ndef run(p, c):\n    return json.loads('1')\n", 1)),
    case("rebind-_write_-as-parameter", """
import json
def run(params, context, _write_=lambda obj: obj):
    try:
        json.loads = lambda s: 'TAMPERED'
    except Exception:
        pass
    log(json.loads('1'))
    return json.loads('1')
""", evidence=TAMPER, after=("import json\ndef run(p, c):\n    return json.loads('1')\n", 1)),
    case("rebind-_write_-through-global", """
import json
def run(params, context):
    global _write_
    _write_ = lambda obj: obj
    json.loads = lambda s: 'TAMPERED'
    log(json.loads('1'))
    return json.loads('1')
""", evidence=TAMPER),
    case("rebind-_write_-through-globals-dict", """
import json
def run(params, context):
    globals()['_write_'] = lambda obj: obj
    json.loads = lambda s: 'TAMPERED'
    log(json.loads('1'))
    return json.loads('1')
""", expect="code_error", evidence=TAMPER),
    case("rebind-_write_-by-import-alias", """
import uuid
from functools import total_ordering as _write_
def run(params, context):
    uuid.UUID.hex = 'TAMPERED'
    log(uuid.NAMESPACE_DNS.hex)
    return uuid.NAMESPACE_DNS.hex
""", evidence=TAMPER),
    case("rebind-_write_-as-loop-target", """
import json
def run(params, context):
    for _write_ in [lambda obj: obj]:
        json.loads = lambda s: 'TAMPERED'
    log(json.loads('1'))
    return json.loads('1')
""", evidence=TAMPER),
    case("rebind-_write_-by-walrus", """
import json
def run(params, context):
    if (_write_ := lambda obj: obj):
        json.loads = lambda s: 'TAMPERED'
    log(json.loads('1'))
    return json.loads('1')
""", evidence=TAMPER),
    case("rebind-_write_-by-def", """
import json
def _write_(obj):
    return obj
def run(params, context):
    json.loads = lambda s: 'TAMPERED'
    log(json.loads('1'))
    return json.loads('1')
""", evidence=TAMPER),
    case("rebind-_getattr_-to-unguarded-getter", SUBCLASS_WALK + """
def _getattr_(obj, name):
    return obj.__getattribute__(name)
def run(params, context):
    found = host_modules(().__class__.__base__)
    log(found)
    return found
"""),
]


def forbidden_import(module: str, use: str, evidence: str = LEAK) -> dict[str, Any]:
    return {
        "code": f"import {module}\ndef run(params, context):\n    found = {use}\n"
        "    log(found)\n    return found\n",
        "evidence": evidence,
    }


IMPORTS = [
    case("import-os", **forbidden_import("os", "list(os.sys.modules)")),
    case("import-sys", **forbidden_import("sys", "list(sys.modules)")),
    case("import-subprocess", **forbidden_import("subprocess", "list(subprocess.sys.modules)")),
    case("import-socket", **forbidden_import("socket", "list(socket.sys.modules)")),
    case("import-importlib", **forbidden_import(
        "importlib", "list(importlib.import_module('sys').modules)")),
    case("import-builtins-open", **forbidden_import(
        "builtins", "builtins.open('/proc/self/status').read()", FILE)),
    case("import-io-open", **forbidden_import("io", "io.open('/proc/self/status').read()", FILE)),
    case("import-posix-read", **forbidden_import(
        "posix", "posix.read(posix.open('/proc/self/status', posix.O_RDONLY), 4096).decode()",
        FILE)),
    case("import-inspect", **forbidden_import("inspect", "list(inspect.sys.modules)")),
    case("import-traceback", **forbidden_import("traceback", "list(traceback.sys.modules)")),
    case("import-signal", **forbidden_import(
        "signal", "list(getattr(signal, '__builtins__')['__import__']('sys').modules)")),
    case("import-ctypes-pythonapi", """
import ctypes
def run(params, context):
    load = ctypes.pythonapi.PyImport_ImportModule
    load.restype = ctypes.py_object
    found = list(load(b'sys').modules)
    log(found)
    return found
"""),
    case("import-pickle-global-opcode", """
import pickle
def run(params, context):
    sys = pickle.loads(b'cbuiltins\\n__import__\\n(Vsys\\ntR.')
    found = list(sys.modules)
    log(found)
    return found
"""),
    case("import-copy-with-__reduce__", """
import copy
class Thief:
    def __reduce__(self):
        return (getattr, (log, '__globals__'))
def run(params, context):
    found = list(copy.copy(Thief())['sys'].modules)
    log(found)
    return found
"""),
    case("__reduce_ex__-constructor-globals", """
class Plain:
    pass
def run(params, context):
    constructor = Plain().__reduce_ex__(2)[0]
    found = list(constructor.__globals__['__builtins__']['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("__reduce__-via-getattr", """
class Plain:
    pass
def run(params, context):
    constructor = getattr(Plain(), '__redu' + 'ce__')()[0]
    host = getattr(constructor, '__glob' + 'als__')['__builtins__']
    found = list(host['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("import-gc-get_referents", """
import gc
def run(params, context):
    host = [r for r in gc.get_referents(log) if isinstance(r, dict) and 'sys' in r][0]
    found = list(host['sys'].modules)
    log(found)
    return found
"""),
    case("import-gc-get_objects", """
import gc
def run(params, context):
    gc.unfreeze()
    for obj in gc.get_objects():
        if isinstance(obj, dict) and '_execute' in obj and 'sys' in obj:
            found = list(obj['sys'].modules)
            log(found)
            return found
"""),
    case("import-json-submodule", **forbidden_import(
        "json.decoder", "list(json.decoder.re.enum.sys.modules)")),
    case("import-urllib-request", **forbidden_import(
        "urllib.request", "list(urllib.request.sys.modules)")),
    case("relative-import", """
from . import json
def run(params, context):
    found = list(json.codecs.sys.modules)
    log(found)
    return found
""", plain=False),
    case("fork-bomb", """
import os
def run(params, context):
    log(list(os.sys.modules))
    while True:
        os.fork()
"""),
    case("thread-bomb", """
import threading
def run(params, context):
    log(list(getattr(threading, '_sys').modules))
    while True:
        threading.Thread(target=lambda: None).start()
"""),
    case("__import__-builtin", """
def run(params, context):
    found = list(__import__('sys').modules)
    log(found)
    return found
"""),
    case("__builtins__-__import__", """
def run(params, context):
    table = __builtins__ if isinstance(__builtins__, dict) else vars(__builtins__)
    found = list(table['__import__']('sys').modules)
    log(found)
    return found
"""),
    case("globals-__builtins__", """
def run(params, context):
    table = globals()['__builtins__']
    table = table if isinstance(table, dict) else vars(table)
    found = list(table['__import__']('sys').modules)
    log(found)
    return found
""", expect="code_error"),
    case("locals-at-module-level", """
table = locals()['__builtins__']
table = table if isinstance(table, dict) else vars(table)
found = list(table['__import__']('sys').modules)
log(found)
def run(params, context):
    return found
""", expect="code_error"),
    case("eval", """
def run(params, context):
    found = list(eval("__import__('sys')").modules)
    log(found)
    return found
"""),
    case("exec", """
def run(params, context):
    exec("import sys; log(list(sys.modules))")
    return 'executed'
"""),
    case("compile-then-eval-by-reference", """
def run(params, context):
    sys = list(map(eval, [compile("__import__('sys')", 'x', 'eval')]))[0]
    found = list(sys.modules)
    log(found)
    return found
""", expect="code_error"),
    case("open-builtin", """
def run(params, context):
    found = open('/proc/self/status').read()
    log(found)
    return found
""", evidence=FILE),
    case("help-builtin-globals", """
def run(params, context):
    found = list(help.__call__.__globals__['sys'].modules)
    log(found)
    return found
""", expect=("code_error", "policy_violation")),
    # breakpoint() would start pdb on the child's stdin: nothing to show for it here.
    case("breakpoint", """
def run(params, context):
    breakpoint()
    return 'debugged'
""", plain=False),
]

SOURCE_TRICKS = [
    # Identifiers are NFKC-normalised by the parser: `eval` spelt in fullwidth letters is
    # `eval` (the policy must see the normalised names).
    case("fullwidth-eval", fullwidth("""
def run(params, context):
    found = list(eval("__import__('sys')").modules)
    log(found)
    return found
""", "eval")),
    case("fullwidth-dunder-attributes", fullwidth("""
def run(params, context):
    for sub in ().__class__.__base__.__subclasses__():
        if sub.__name__ == '_wrap_close':
            found = list(sub.__init__.__globals__['sys'].modules)
            log(found)
            return found
""", "__class__", "__base__", "__subclasses__", "__init__", "__globals__")),
    case("fullwidth-gi_frame", fullwidth("""
def run(params, context):
    def gen():
        frame = g.gi_frame.f_back.f_back
        yield list(frame.f_globals['sys'].modules)
    g = gen()
    found = next(g)
    log(found)
    return found
""", "gi_frame", "f_back", "f_globals")),
    case("carriage-return-hides-a-line", "import json  # harmless\rimport os\n"
         "def run(params, context):\n    found = list(os.sys.modules)\n"
         "    log(found)\n    return found\n"),
    case("line-continuation-import", """
import \\
    os
def run(params, context):
    found = list(os.sys.modules)
    log(found)
    return found
"""),
    # The source arrives decoded: a coding cookie is ignored, so the UTF-7 line stays a
    # comment (which would hide `().__class__` from a reviewer decoding it as UTF-7).
    case("utf-7-coding-cookie", """
# coding: utf-7
def run(params, context):
    #+AAo-    return list(().__class__.__base__.__subclasses__())
    return 1 +AAo-
""", expect="code_error", plain=False),
    case("nul-byte-in-source", "import json\n# \x00\nimport os\n"
         "def run(params, context):\n    return list(os.sys.modules)\n",
         expect="code_error", plain=False),
]

# What the widened language layer (own classes' special methods, `super`, `vars`, namedtuple's
# public `_` names) must not hand out. An own class inherits `object.__setattr__` and the
# special methods of any foreign base, unbound: called on a shared object they write it with
# no guard. A worker then carries the change (and code the connector defined) into the next
# execution: the first case rewrites the next request's source through `json.loads`.
WIDENING = [
    case("own-class-object-__setattr__-hijacks-next-request", **tamper(
        "json",
        """
        class Own:
            pass
        def hook(d):
            if 'source' in d and 'entry_point' in d:
                d['source'] = "def run(params, context):\\n    return 'TAMPERED'\\n"
            return d
        Own.__setattr__(json.loads, '__kwdefaults__', {
            'cls': None, 'object_hook': hook, 'parse_float': None, 'parse_int': None,
            'parse_constant': None, 'object_pairs_hook': None})
        """,
        "json.loads('{\"source\": 1, \"entry_point\": 2}')['source'] != 1",
        JSON_INTACT,
    )),
    case("own-class-object-__setattr__-retypes-shared-uuid", **tamper(
        "uuid",
        """
        class Evil(uuid.UUID):
            __slots__ = ()
            def __str__(self):
                return 'TAMPERED'
        class Own:
            pass
        Own.__setattr__(uuid.NAMESPACE_URL, '__class__', Evil)
        """,
        "str(uuid.NAMESPACE_URL) == 'TAMPERED'",
        ("str(uuid.NAMESPACE_URL)", "6ba7b811-9dad-11d1-80b4-00c04fd430c8"),
    )),
    case("own-class-object-__delattr__-on-shared-uuid", **tamper(
        "uuid",
        """
        class Own:
            pass
        Own.__delattr__(uuid.NAMESPACE_X500, 'int')
        """,
        "not hasattr(uuid.NAMESPACE_X500, 'int')",
        ("str(uuid.NAMESPACE_X500)", "6ba7b814-9dad-11d1-80b4-00c04fd430c8"),
    )),
    case("super-of-own-class-object-__setattr__", **tamper(
        "uuid",
        """
        class Own:
            pass
        super(Own, Own).__setattr__(uuid.NAMESPACE_OID, 'int', 0x7A3E)
        """,
        "uuid.NAMESPACE_OID.int == 0x7A3E",
        ("str(uuid.NAMESPACE_OID)", "6ba7b812-9dad-11d1-80b4-00c04fd430c8"),
    )),
    # A guard that hands out a functools.partial of the raw method hands it out whole:
    # partial's public `args` and `func` give it back.
    case("guarded-inherited-__setattr__-unwrapped", **tamper(
        "uuid",
        """
        class Own:
            pass
        setter = Own.__setattr__
        for route in ('args', 'func'):
            try:
                setter = getattr(setter, route)
            except AttributeError:
                continue
            setter = setter[0] if route == 'args' else setter
            break
        setter(uuid.NAMESPACE_OID, 'int', 0x7A3E)
        """,
        "uuid.NAMESPACE_OID.int == 0x7A3E",
        ("str(uuid.NAMESPACE_OID)", "6ba7b812-9dad-11d1-80b4-00c04fd430c8"),
    )),
    case("own-subclass-of-super-bound-to-shared-object", **tamper(
        "uuid",
        """
        class Proxy(super):
            pass
        Proxy(uuid.UUID, uuid.NAMESPACE_OID).__setattr__('int', 0x7A3E)
        """,
        "uuid.NAMESPACE_OID.int == 0x7A3E",
        ("str(uuid.NAMESPACE_OID)", "6ba7b812-9dad-11d1-80b4-00c04fd430c8"),
    )),
    case("foreign-base-__init__-through-own-subclass", **tamper(
        "uuid",
        """
        class Mine(uuid.UUID):
            __slots__ = ()
        Mine.__init__(uuid.NAMESPACE_DNS, int=0x7A3E)
        """,
        "uuid.NAMESPACE_DNS.int == 0x7A3E",
        ("uuid.NAMESPACE_DNS.hex", "6ba7b8109dad11d180b400c04fd430c8"),
    )),
    case("property-__init__-reinitialises-shared-property", **tamper(
        "uuid",
        """
        class Prop(property):
            pass
        Prop.__init__(vars(uuid.UUID)['hex'], lambda self: 'TAMPERED')
        """,
        "uuid.NAMESPACE_DNS.hex == 'TAMPERED'",
        ("uuid.NAMESPACE_DNS.hex", "6ba7b8109dad11d180b400c04fd430c8"),
    )),
    case("classmethod-__init__-reinitialises-shared-classmethod", **tamper(
        "collections",
        """
        class Method(classmethod):
            pass
        Method.__init__(vars(collections.Counter)['fromkeys'], lambda cls, *args: 'TAMPERED')
        """,
        "collections.Counter.fromkeys('ab') == 'TAMPERED'",
        ("collections.Counter.fromkeys.__name__", "fromkeys"),
    )),
    # A namedtuple class's _field_defaults is one dict for every execution (a copy would
    # end the payload at its assert; connector code may not read it at all). The after-run
    # cannot read it either: it checks that the next execution works.
    case("namedtuple-_field_defaults-shared-dict", **tamper(
        "urllib.parse",
        """
        urllib.parse.SplitResult._field_defaults['stash'] = 'TAMPERED'
        assert urllib.parse.SplitResult._field_defaults['stash'] == 'TAMPERED', 'a copy'
        """,
        "urllib.parse.SplitResult._field_defaults.get('stash') == 'TAMPERED'",
        ("urllib.parse.urlsplit('http://a/b').path", "/b"), swallow=False,
    ), expect=("policy_violation", "code_error")),
    case("namedtuple-instance-_field_defaults-shared-dict", **tamper(
        "decimal",
        """
        decimal.Decimal(1).as_tuple()._field_defaults['stash'] = 'TAMPERED'
        assert decimal.Decimal(2).as_tuple()._field_defaults['stash'] == 'TAMPERED', 'a copy'
        """,
        "decimal.Decimal(3).as_tuple()._field_defaults.get('stash') == 'TAMPERED'",
        ("decimal.Decimal(1).as_tuple().digits", [1]), swallow=False,
    ), expect=("policy_violation", "code_error")),
    # ... also through a connector class that inherits it.
    case("own-subclass-reaches-foreign-_field_defaults", **tamper(
        "urllib.parse",
        """
        class Mine(urllib.parse.SplitResult):
            __slots__ = ()
        Mine._field_defaults['stash'] = 'TAMPERED'
        assert urllib.parse.SplitResult._field_defaults['stash'] == 'TAMPERED', 'a copy'
        """,
        "urllib.parse.SplitResult._field_defaults.get('stash') == 'TAMPERED'",
        ("urllib.parse.urlsplit('http://a/b').path", "/b"), swallow=False,
    ), expect=("policy_violation", "code_error")),
    # A slot named __del__ is a finalizer: CPython calls whatever the instance holds there
    # when it is collected (maybe in a later execution). The instance's own, bound
    # __setattr__ fills it (it checks no name).
    case("slot-named-__del__-is-a-finalizer", """
class Zombie:
    __slots__ = ('__del__',)
def run(params, context):
    zombie = Zombie()
    zombie.__setattr__('__del__', lambda: log('TAMPERED'))
    del zombie
    return 'collected'
""", evidence=TAMPER),
    case("slot-named-__getattribute__-via-super", """
class Spy:
    __slots__ = ('__getattribute__',)
def run(params, context):
    spy = Spy()
    super(Spy, spy).__setattr__('__getattribute__', lambda name: 'TAMPERED')
    found = spy.anything
    log(found)
    return found
""", evidence=TAMPER),
    # The child's own frames to the host go through json.dumps: a connector class swapped
    # in as its default encoder forges the answer (here its logs).
    case("json-dumps-kwdefaults-forges-the-answer-logs", """
import json
class Own:
    pass
class Forger(json.JSONEncoder):
    def encode(self, o):
        if isinstance(o, dict) and 'logs' in o:
            o['logs'] = [['info', 'TAMPERED']]
        return json.JSONEncoder.encode(self, o)
def run(params, context):
    Own.__setattr__(json.dumps, '__kwdefaults__', {
        'skipkeys': False, 'ensure_ascii': True, 'check_circular': True, 'allow_nan': True,
        'cls': Forger, 'indent': None, 'separators': None, 'default': None,
        'sort_keys': False})
    return 'forged'
""", evidence=TAMPER),
    # ... or its error: a violation the code caught comes out as a mere code_error.
    case("json-dumps-kwdefaults-hides-a-violation", """
import json
class Own:
    pass
class Forger(json.JSONEncoder):
    def encode(self, o):
        if isinstance(o, dict) and 'type' in o:
            o['type'], o['message'] = 'code_error', 'TAMPERED'
        return json.JSONEncoder.encode(self, o)
def run(params, context):
    Own.__setattr__(json.dumps, '__kwdefaults__', {
        'skipkeys': False, 'ensure_ascii': True, 'check_circular': True, 'allow_nan': True,
        'cls': Forger, 'indent': None, 'separators': None, 'default': None,
        'sort_keys': False})
    try:
        import os
    except Exception:
        pass
    raise ValueError('the answer says what Forger wants')
""", evidence=TAMPER),
    # mro() of an enum class reaches Enum itself, and Enum's functional API builds a class
    # from a dict: any special method, __del__ too (the allocations trigger a collection).
    case("enum-functional-api-defines-__del__", """
import re
def define():
    Enum = type(re.A).mro()[-2]
    def finalizer(member):
        log('TAMPERED')
    Enum('Evil', {'A': 1, '__del__': finalizer})
def run(params, context):
    define()
    for _ in range(100):
        junk = [[] for _ in range(1000)]
    return 'collected'
""", evidence=TAMPER),
    case("enum-functional-api-from-uuid-safety", """
import uuid
def define():
    Enum = type(uuid.uuid4().is_safe).mro()[-2]
    def finalizer(member):
        log('TAMPERED')
    Enum('Evil', [('A', 1), ('__del__', finalizer)])
def run(params, context):
    define()
    for _ in range(100):
        junk = [[] for _ in range(1000)]
    return 'collected'
""", evidence=TAMPER),
    # `object` is a builtin now: a class pattern reads attributes with no guard.
    case("match-class-pattern-reads-attributes", """
def run(params, context):
    match log:
        case object(__globals__=table):
            found = list(table['sys'].modules)
    log(found)
    return found
"""),
    case("own-class-inherited-__getattribute__", """
class Own:
    pass
def run(params, context):
    found = list(Own.__getattribute__(log, '__globals__')['sys'].modules)
    log(found)
    return found
"""),
    case("metaclass-through-own-instance-__class__", SUBCLASS_WALK + """
class Own:
    pass
def run(params, context):
    found = host_modules(Own().__class__.__class__.__base__)
    log(found)
    return found
"""),
    # namedtuple() names the caller's module: its classes count as the connector's own.
    case("own-namedtuple-method-globals", """
import collections
def run(params, context):
    Point = collections.namedtuple('Point', 'x y')
    found = list(Point.__repr__.__globals__['_sys'].modules)
    log(found)
    return found
"""),
    # Under the language layer str.format is a partial of the guards' own formatter, and
    # `print` goes through a printer object bound to the guards; the module view's
    # __getattr__ holds the real module. None of them exists without the layer.
    case("format-partial-func-reaches-the-guards", """
def run(params, context):
    guards = '{}'.format.func.__self__
    found = list(guards._imports._modules['json'].codecs.sys.modules)
    log(found)
    return found
""", plain=False),
    case("printer-object-reaches-the-guards", """
def run(params, context):
    print('x')
    guards = _print._getattr_.__self__
    found = list(guards._imports._modules['json'].codecs.sys.modules)
    log(found)
    return found
""", plain=False),
    case("module-view-retyped-to-own-module-class", """
import json
class Own:
    pass
class Module(type(json)):
    pass
def run(params, context):
    Own.__setattr__(json, '__class__', Module)
    real = json.__dict__['__getattr__'].__closure__[0].cell_contents
    found = list(real.codecs.sys.modules)
    log(found)
    return found
""", plain=False),

    # --- Second review. ---
    # Corral's error path formats the code's exception only after it looked at the tripwire:
    # a violation the exception's own __str__ commits (and catches) is never reported.
    case("exception-__str__-violates-after-the-tripwire-was-read", """
class Loud(Exception):
    def __str__(self):
        try:
            import sys
            found = ' '.join(sys.modules)
            log(found)
            return found
        except Exception:
            return 'nothing to see'
def run(params, context):
    raise Loud()
"""),
    # type() of `list[int]` is types.GenericAlias: calling an alias calls its origin, then
    # sets `__orig_class__` on whatever that returned, with no guard: a shared class or
    # function gains an attribute every later execution sees (and keeps this one's lambda,
    # its globals and guards alive for good).
    case("generic-alias-call-writes-__orig_class__-on-shared-objects", **tamper(
        "json",
        """
        Alias = type(list[int])
        Alias(lambda: json.dumps, ())()
        Alias(lambda: json.JSONEncoder, ())()
        """,
        "'__orig_class__' in dir(json.dumps) or '__orig_class__' in dir(json.JSONEncoder)",
        ("'__orig_class__' in dir(json.dumps) or '__orig_class__' in dir(json.JSONEncoder)",
         False),
    )),
    # A GenericAlias forwards every attribute it does not know to its origin, past the
    # checks that look at the object asked (`mro` of a class, `register` of an ABC):
    # `ChainMap[int]` is one, and type(list[int]) makes one of any class.
    case("generic-alias-forwards-register-to-a-shared-abc", **tamper(
        "collections, re",
        "collections.ChainMap[int].register(re.Match)",
        "isinstance(re.match('x', 'x'), collections.ChainMap)",
        ("isinstance(re.match('x', 'x'), collections.ChainMap)", False),
    )),
    # (The clean run after it asks Counter, which treats a Mapping apart: a fix may refuse
    # mro(), so that run cannot name Mapping itself.)
    case("generic-alias-forwards-mro-then-register-to-mapping", **{
        **tamper(
            "collections, re",
            """
            Mapping = collections.ChainMap[int].mro()[2]
            type(list[int])(Mapping, ()).register(re.Pattern)
            """,
            "isinstance(re.compile('x'), collections.ChainMap[int].mro()[2])",
            JSON_INTACT,
        ),
        "after": ("""
import collections
import re
def run(params, context):
    try:
        collections.Counter(a=1).update(re.compile('x'))
    except AttributeError:
        return 'a mapping'
    except TypeError:
        return 'not a mapping'
""", "not a mapping"),
    }),
    case("generic-alias-forwards-mro-to-enum-functional-api-__del__", """
import re
def define():
    Enum = type(list[int])(type(re.A), ()).mro()[-2]
    def finalizer(member):
        log('TAMPERED')
    Enum('Evil', {'A': 1, '__del__': finalizer})
def run(params, context):
    define()
    for _ in range(100):
        junk = [[] for _ in range(1000)]
    return 'collected'
""", evidence=TAMPER),
    # With Enum back in hand, a connector enum class (its module is the caller's) shows
    # its metaclass's methods: `_private` finds no definer in the class's MRO for them and
    # treats them as the connector's own. EnumType._convert_ reads sys.modules[module].
    case("generic-alias-enum-metaclass-_convert_-reads-sys-modules", """
import re
def run(params, context):
    Enum = type(list[int])(type(re.A), ()).mro()[-2]
    Base = Enum('Base', [])
    Leak = Base._convert_('Leak', 'uuid', lambda name: name == 'sys')
    found = list(Leak.sys.value.modules)
    log(found)
    return found
"""),
    # staticmethod() copies the wrapped object's __annotations__ into its own __dict__, by
    # reference, and a connector subclass's instance shows its __dict__: json.dumps's
    # annotations dict is one for every execution.
    case("staticmethod-subclass-__dict__-holds-a-shared-annotations-dict", **{
        **tamper(
            "json",
            """
            class Copy(staticmethod):
                pass
            Copy(json.dumps).__dict__['__annotations__']['stash'] = 'TAMPERED'
            """,
            "'stash' in Copy(json.dumps).__dict__['__annotations__']",
            JSON_INTACT,
        ),
        # The instance's __dict__ comes as a copy without special names: the check fails
        # on the missing key (and so could any after-run that tried to read it).
        "expect": ("policy_violation", "code_error"),
    }),
    # A bound method forwards what its type lacks to its __func__, and types.MethodType is
    # type() of any bound method: bound to anything, a class answers for it.
    case("method-type-forwards-register-to-a-shared-abc", **tamper(
        "collections, re",
        """
        class Own:
            def method(self):
                pass
        type(Own().method)(collections.ChainMap, 0).register(re.Match)
        """,
        "isinstance(re.match('x', 'x'), collections.ChainMap)",
        ("isinstance(re.match('x', 'x'), collections.ChainMap)", False),
    )),
    case("method-type-forwards-mro-to-enum-_convert_", """
import re
class Own:
    def method(self):
        pass
def run(params, context):
    Enum = type(Own().method)(type(re.A), 0).mro()[-2]
    Base = Enum('Base', [])
    Leak = Base._convert_('Leak', 'uuid', lambda name: name == 'sys')
    found = list(Leak.sys.value.modules)
    log(found)
    return found
"""),
    # A connector subclass of GenericAlias is the connector's own object, and its getattr
    # is GenericAlias's, which asks the origin: a `_` name it finds nowhere in the subclass's
    # MRO (no definer) passes `_private` as the connector's own, read on any object.
    case("own-generic-alias-subclass-reads-_convert_-of-a-foreign-enum", """
import uuid
class Forward(type(list[int])):
    pass
def run(params, context):
    convert = Forward(type(uuid.uuid4().is_safe), ())._convert_
    Leak = convert('Leak', 'uuid', lambda name: name == 'sys')
    found = list(Leak.sys.value.modules)
    log(found)
    return found
"""),
    case("own-generic-alias-subclass-reaches-a-shared-_field_defaults", **tamper(
        "urllib.parse",
        """
        class Forward(type(list[int])):
            pass
        Forward(urllib.parse.SplitResult, ())._field_defaults['stash'] = 'TAMPERED'
        """,
        "'stash' in Forward(urllib.parse.SplitResult, ())._field_defaults",
        ("urllib.parse.urlsplit('http://a/b').path", "/b"),
    )),
    # ... and `__dict__`, which the connector's own objects show, is the origin's: any
    # object's attributes, written past the write guard (a shared enum member's name).
    case("own-generic-alias-subclass-__dict__-is-any-objects-dict", **tamper(
        "re",
        """
        class Forward(type(list[int])):
            pass
        Forward(re.I, ()).__dict__['_name_'] = 'TAMPERED'
        """,
        "repr(re.I) == 're.TAMPERED'",
        ("repr(re.I)", "re.IGNORECASE"),
    )),
    # super.__init__, bound to the connector's own super subclass, binds it anew: to a
    # shared object, after the guard saw it bound to the connector's own (refused today: the
    # guard reads the binding again at every access; kept so that it stays so).
    case("own-super-subclass-rebound-to-a-shared-object-by-its-own-__init__", **tamper(
        "uuid",
        """
        class Own:
            pass
        class Proxy(super):
            pass
        proxy = Proxy(Own, Own())
        super(Proxy, proxy).__init__(uuid.UUID, uuid.NAMESPACE_OID)
        proxy.__setattr__('int', 0x7A3E)
        """,
        "uuid.NAMESPACE_OID.int == 0x7A3E",
        ("str(uuid.NAMESPACE_OID)", "6ba7b812-9dad-11d1-80b4-00c04fd430c8"),
    )),
    # ... as are the special methods a class may define that GenericAlias itself lacks
    # (`__get__`, `__set__`, ...): a slot's member descriptor, which vars() shows, sets it
    # on a shared UUID past UUID's own __setattr__.
    case("own-generic-alias-subclass-__set__-of-a-slot-descriptor", **tamper(
        "uuid",
        """
        class Forward(type(list[int])):
            pass
        Forward(vars(uuid.UUID)['int'], ()).__set__(uuid.NAMESPACE_X500, 0x7A3E)
        """,
        "uuid.NAMESPACE_X500.int == 0x7A3E",
        ("str(uuid.NAMESPACE_X500)", "6ba7b814-9dad-11d1-80b4-00c04fd430c8"),
    )),

    # --- Third review. ---
    # An own class's __dict__ is its real mappingproxy: it holds the `__dict__` descriptor
    # CPython made for the class's instances. Installed in a class that also derives from
    # staticmethod, that descriptor reads the staticmethod's real dict, past the copy
    # `_own_dict` makes: json.dumps's own (shared) __annotations__ dict is in it.
    case("own-class-__dict__-descriptor-reads-a-staticmethods-real-dict", **{
        **tamper(
            "json",
            """
            class Own:
                pass
            class Peek(staticmethod, Own):
                seen = Own.__dict__['__dict__']
            Peek(json.dumps).seen['__annotations__']['stash'] = 'TAMPERED'
            """,
            "'stash' in Peek(json.dumps).seen['__annotations__']",
            JSON_INTACT,
        ),
        # A fix that hands out a copy without the descriptor leaves Peek undefined.
        "expect": ("policy_violation", "code_error"),
    }),
    # ... or from `super(Own, Own).__dict__`, which for a class deriving from staticmethod is
    # staticmethod's own `__dict__` descriptor (it applies to any staticmethod), set on an
    # own class after it was made (no class body sees it).
    case("super-of-own-class-__dict__-is-staticmethods-__dict__-descriptor", **{
        **tamper(
            "json",
            """
            class Mine(staticmethod):
                pass
            class Peek(staticmethod):
                pass
            Peek.seen = super(Mine, Mine).__dict__
            Peek(json.dumps).seen['__annotations__']['stash'] = 'TAMPERED'
            """,
            "'stash' in Peek(json.dumps).seen['__annotations__']",
            JSON_INTACT,
        ),
        "expect": ("policy_violation", "code_error"),
    }),
    # A return value json cannot encode is described after the tripwire was read: the
    # TypeError its own dict's items() raised says a str subclass, whose __str__ (the
    # connector's) runs when the message is made, and its caught violation is never reported.
    case("unserialisable-output-message-violates-after-the-tripwire-was-read", """
class Message(str):
    def __str__(self):
        try:
            import sys
            found = ' '.join(sys.modules)
            log(found)
            return found
        except Exception:
            return 'nothing to see'
class Unencodable(TypeError):
    def __str__(self):
        return Message('unencodable')
class Output(dict):
    def items(self):
        raise Unencodable()
def run(params, context):
    return Output(a=1)
""", expect=("policy_violation", "code_error"), plain=False),  # the message is made plain at
    # once (str.__str__), which never calls Message.__str__: with or without the layer
]

# fmt: on

CORPUS = (
    FRAMES + SUBCLASSES + FORMATS + MODULE_WALKS + WRITES + GUARD_NAMES + IMPORTS + SOURCE_TRICKS
) + WIDENING


# ---------------------------------------------------------------------------------------------
# The checks.


def _texts(error: corral.SandboxError | None, result: Any = None) -> str:
    parts = []
    if error is not None:
        parts.append(error.message)
        parts.extend(entry.message for entry in error.logs)
    if result is not None:
        parts.append(repr(result.output))
        parts.extend(entry.message for entry in result.logs)
    return "\n".join(parts)


def assert_refused(sandbox: NodeSandbox, case: Case) -> corral.SandboxError:
    """Run the payload: it must fail with one of the case's types and show no evidence."""
    try:
        result = sandbox.execute_sync(
            case.code, params={"id": 1}, timeout_ms=TIMEOUT_MS, limits=LIMITS
        )
    except corral.SandboxError as error:
        text = _texts(error)
        assert error.type in case.expect, f"{error.type}: {error.message}"
        for evidence in EVIDENCE:
            assert evidence not in text, f"the payload produced {evidence!r}: {text[:2000]}"
        return error
    pytest.fail(f"the payload ran to the end: {_texts(None, result)[:2000]}")


@pytest.mark.parametrize("case", CORPUS)
def test_escape_is_refused(sandbox, case):
    """The technique is refused, nothing it was after leaks, and a clean execution that
    follows in the same sandbox sees the shared objects unchanged."""
    assert_refused(sandbox, case)
    if case.after is not None:
        code, expected = case.after
        assert sandbox.execute_sync(code, timeout_ms=TIMEOUT_MS).output == expected


def test_corpus_is_large_and_distinct():
    assert len(CORPUS) >= 70
    assert len({p.values[0].code for p in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", [p for p in CORPUS if p.values[0].plain])
def test_payload_escapes_without_the_language_layer(plain, case):
    """Without the language layer, the payload does produce its evidence: the case
    above tests the policy, not a broken payload."""
    try:
        result = plain.execute_sync(
            case.code, params={"id": 1}, timeout_ms=TIMEOUT_MS, limits=LIMITS
        )
        text = _texts(None, result)
    except corral.SandboxError as error:
        text = _texts(error)
    assert case.evidence in text, text[:2000]


# ---------------------------------------------------------------------------------------------
# A fallback of CPython's `from ... import` that only shows when the child has the submodule
# loaded (the zygote does not load urllib.request today): checked on the policy itself, in
# this process, where it is loaded.


def test_from_import_never_falls_back_on_sys_modules():
    """`from urllib import request` must not reach the real urllib.request through
    sys.modules when the package view lacks it."""
    import urllib.request  # noqa: F401 - loaded, as a child could one day have it

    code, _, message = compile_connector(
        "from urllib import request\n"
        "def run(params, context):\n"
        "    return list(request.sys.modules)\n"
    )
    assert code is not None, message
    logged: list[str] = []
    guards = Guards(ImportPolicy(DEFAULT_ALLOWED_IMPORTS), logged.append, object)
    namespace = guards.globals()
    leaked = None
    with pytest.raises(PolicyError):
        exec(code, namespace)
        leaked = namespace["run"]({}, {})
    assert leaked is None
    assert guards.violations


# ---------------------------------------------------------------------------------------------
# Later executions. What an execution leaves on a warm worker must neither run nor show in the
# executions that follow it. The payload itself may well succeed (a fix may let it, and retire
# the worker or drop what it left): the checks are that no evidence shows in its own answer,
# and that clean executions after it, in the same sandbox, give their usual output.


@dataclass(frozen=True)
class Later:
    """A payload, a clean execution run `runs` times after it, and what that one must give.

    `plain`: without the language layer the payload does change what the clean runs give
    (on a worker); False where the technique needs the language layer itself.
    """

    code: str
    after: str
    expected: Any
    runs: int = 2
    plain: bool = True


def later(id: str, code: str, after: str, expected: Any, runs: int = 2, plain: bool = True) -> Any:
    body = textwrap.dedent(code).lstrip("\n")
    clean = textwrap.dedent(after).lstrip("\n")
    return pytest.param(Later(body, clean, expected, runs, plain), id=id)


#: A clean execution whose answer depends on the execution thread's decimal context.
DECIMAL_THIRD = """
import decimal
def run(params, context):
    return str(decimal.Decimal(1) / decimal.Decimal(3))
"""
THIRD = "0." + "3" * 28

# fmt: off
# Cases marked plain=False hold with the language layer off too: the worker collects what
# the caches held before it resets the state, and retires when anything of the execution
# (its globals, through any function, frame or generator) survives the clean-up.
LATER = [
    # The worker resets the decimal context, then empties re's cache. A connector str held
    # only by that cache dies in the reset, and with it a generator suspended in `try`:
    # its `finally` (the connector's code) runs after the context was reset.
    later("finalizer-held-by-re-cache-runs-in-the-worker-reset", """
import decimal
import re
class Key(str):
    pass
def linger():
    try:
        yield 1
    finally:
        decimal.getcontext().prec = 3
def run(params, context):
    key = Key('lingering-pattern')
    key.gen = linger()
    next(key.gen)
    re.compile(key)
    return 'planted'
""", DECIMAL_THIRD, THIRD, plain=False),
    # ... with no guard to pass at all when it runs: leaving `with localcontext()` puts back
    # the context saved on entry (this execution's, at prec 3) as the thread's context.
    later("localcontext-exit-held-by-urlsplit-cache-restores-a-stale-context", """
import decimal
import urllib.parse
class Url(str):
    pass
def linger():
    with decimal.localcontext(prec=3):
        yield 1
def run(params, context):
    decimal.getcontext().prec = 3
    url = Url('http://lingering/')
    url.gen = linger()
    next(url.gen)
    urllib.parse.urlsplit(url)
    decimal.getcontext().prec = 28
    return 'planted'
""", DECIMAL_THIRD, THIRD, plain=False),
    # ... held by an enum's value map (a Flag pseudo-member keeps the connector's int).
    later("finalizer-held-by-a-flag-pseudo-member-runs-in-the-worker-reset", """
import decimal
import re
class Bits(int):
    pass
def linger():
    try:
        yield 1
    finally:
        decimal.getcontext().prec = 3
def run(params, context):
    bits = Bits(1 << 20)
    bits.gen = linger()
    next(bits.gen)
    type(re.A)(bits)
    return 'planted'
""", DECIMAL_THIRD, THIRD, plain=False),
    # ... or a cycle the cache kept through the collections after the execution: garbage
    # once the reset empties the cache, collected whenever a later execution allocates.
    later("cycle-held-by-re-cache-is-collected-in-a-later-execution", """
import decimal
import re
class Key(str):
    pass
def linger(key):
    try:
        yield 1
    finally:
        decimal.getcontext().prec = 3
def run(params, context):
    key = Key('lingering-cycle')
    key.gen = linger(key)
    next(key.gen)
    re.compile(key)
    return 'planted'
""", """
import decimal
def run(params, context):
    rows = [[] for _ in range(300000)]
    return str(decimal.Decimal(1) / decimal.Decimal(3))
""", THIRD, runs=1, plain=False),
    # print() hands the printer what __str__ returned, a connector str subclass included:
    # its methods run in the printer, and put a connector dict into the pending logs, which
    # the worker's control thread encodes (items() runs) after the answer, past the reset.
    # There the dict sees that its execution's log is closed, and plants a finalizer that
    # runs in the next execution's reset (so the one after that sees prec 3).
    later("printed-str-subclass-runs-code-after-the-answer", """
import decimal
import re
class Key(str):
    pass
def linger():
    try:
        yield 1
    finally:
        decimal.getcontext().prec = 3
class Late(dict):
    def items(self):
        key = Key('planted-after-the-answer')
        key.gen = linger()
        next(key.gen)
        re.compile(key)
        try:
            log('still open')
        except RuntimeError:
            return [('after-the-end', 'TAMPERED')]
        return [('during', 'the execution')]
class Line:
    def split(self, sep):
        return [Late(a=1), '']
class Text(str):
    def encode(self, *args):
        return b''
    def __contains__(self, part):
        return True
    def __radd__(self, other):
        return Line()
class Shown:
    def __str__(self):
        return Text('shown')
def run(params, context):
    print(Shown())
    return 'printed'
""", DECIMAL_THIRD, THIRD, plain=False),  # without the layer print() writes to /dev/null
    # A class body holding a foreign property calls its __set_name__: the property the
    # shared class holds takes the connector's name, in every later error message.
    later("class-body-property-__set_name__-renames-a-shared-property", """
import urllib.parse
class Namer:
    TAMPERED = urllib.parse.SplitResult.hostname
def run(params, context):
    return 'renamed'
""", """
import urllib.parse
class Mine(urllib.parse.SplitResult):
    pass
def run(params, context):
    try:
        Mine('http', 'a', '/', '', '').hostname = 'b'
    except AttributeError as exc:
        return str(exc)
""", "property 'hostname' of 'Mine' object has no setter", runs=1),
]
# fmt: on


def _run_texts(sandbox: NodeSandbox, code: str) -> str:
    try:
        result = sandbox.execute_sync(code, params={"id": 1}, timeout_ms=TIMEOUT_MS, limits=LIMITS)
    except corral.SandboxError as error:
        return _texts(error)
    return _texts(None, result)


@pytest.mark.parametrize("case", LATER)
def test_nothing_reaches_a_later_execution(sandbox, case):
    """The payload shows no evidence, and clean executions after it give their usual output."""
    text = _run_texts(sandbox, case.code)
    for evidence in EVIDENCE:
        assert evidence not in text, f"the payload produced {evidence!r}: {text[:2000]}"
    for run in range(case.runs):
        output = sandbox.execute_sync(case.after, timeout_ms=TIMEOUT_MS).output
        assert output == case.expected, f"clean run {run + 1} after the payload: {output!r}"


@pytest.fixture
def plain_worker() -> Any:
    """A worker with the language layer off: state carries from one execution to the next."""
    with NodeSandbox(
        executor="worker",
        limits=Limits(max_memory_mb=64),
        settings=load_settings(),
        _unsafe_layers_off={"language"},
    ) as box:
        yield box


@pytest.mark.parametrize("case", [p for p in LATER if p.values[0].plain])
def test_later_payload_works_without_the_language_layer(plain_worker, case):
    """Without the language layer the payload does change what a later execution gives:
    the case above tests the worker's reset and the policy, not a broken payload."""
    _run_texts(plain_worker, case.code)
    outputs = [
        plain_worker.execute_sync(case.after, timeout_ms=TIMEOUT_MS).output
        for _ in range(case.runs)
    ]
    assert any(output != case.expected for output in outputs), outputs


#: Changes every setting the interpreter keeps outside a module's namespace (the language
#: layer off), among them a profile function that marks every dict a function returns.
#: The functions hold nothing of the execution (empty globals): a worker that checks only
#: for what outlives an execution keeps running with them.
SETTINGS_PAYLOAD = """
import gc
import sys
import types
def _spy(frame, event, arg):
    if event == 'return' and isinstance(arg, dict):
        arg['spied'] = True
spy = types.FunctionType(_spy.__code__, {})
def run(params, context):
    sys.settrace(types.FunctionType((lambda frame, event, arg: None).__code__, {}))
    sys.setprofile(spy)
    sys.set_asyncgen_hooks(firstiter=spy, finalizer=spy)
    sys.set_coroutine_origin_tracking_depth(7)
    sys.setrecursionlimit(5000)
    sys.setswitchinterval(0.5)
    sys.set_int_max_str_digits(777)
    sys.setdlopenflags(sys.getdlopenflags() ^ 0x100)
    gc.disable()
    gc.set_threshold(1, 2, 3)
    gc.set_debug(gc.DEBUG_SAVEALL)
    return {'planted': True}
"""
SETTINGS_READER = """
import gc
import os
import sys
def run(params, context):
    return {
        'pid': os.getpid(), 'trace': repr(sys.gettrace()), 'profile': repr(sys.getprofile()),
        'asyncgen': repr(tuple(sys.get_asyncgen_hooks())),
        'origin': sys.get_coroutine_origin_tracking_depth(),
        'recursion': sys.getrecursionlimit(), 'switch': sys.getswitchinterval(),
        'digits': sys.get_int_max_str_digits(), 'dlopen': sys.getdlopenflags(),
        'gc': [gc.isenabled(), list(gc.get_threshold()), gc.get_debug()],
    }
"""


def _settings_around(payload: str, reader: str = SETTINGS_READER) -> tuple[Any, Any, Any]:
    """On one worker with the language layer off: what `reader` returns, `payload`'s
    output, and what `reader` returns again."""
    settings = load_settings(CORRAL_WORKER_POOL_SIZE="1")
    limits = Limits(max_memory_mb=64)
    with NodeSandbox(
        executor="worker", limits=limits, settings=settings, _unsafe_layers_off={"language"}
    ) as box:
        return tuple(
            box.execute_sync(code, timeout_ms=TIMEOUT_MS).output
            for code in (reader, payload, reader)
        )


def test_a_worker_puts_the_interpreter_s_settings_back_without_the_language_layer():
    """Trace and profile functions, hooks, limits and the collector's settings do not
    outlive the execution that set them, even where connector code reaches `sys` and `gc`:
    the next execution on the same worker (same pid) reads what the first one read."""
    before, planted, after = _settings_around(SETTINGS_PAYLOAD)
    assert planted == {"planted": True, "spied": True}, planted  # its profile function ran
    assert after == before


#: A finalizer that sets a profile function, run by the worker's clean-up: after the
#: settings were put back for the first time.
LATE_SETTING_PAYLOAD = """
import sys
import types
def _spy(frame, event, arg):
    if event == 'return' and isinstance(arg, dict):
        arg['spied'] = True
spy = types.FunctionType(_spy.__code__, {})
class Late:
    def __del__(self):
        sys.setprofile(spy)
def run(params, context):
    late = Late()
    late.cycle = late
    return {'planted': True}
"""


def test_a_setting_changed_in_the_worker_s_clean_up_retires_the_worker():
    """What a finalizer sets during the clean-up, after the settings were put back, is
    not trusted to the next execution: the worker retires, and a fresh one runs it."""
    before, planted, after = _settings_around(LATE_SETTING_PAYLOAD)
    assert planted == {"planted": True}, planted
    assert after.pop("pid") != before.pop("pid"), "the worker that ran the finalizer ran on"
    assert after == before


#: What one execution may change of the process that the next would inherit: readers and
#: a payload for the worker's process reset (language layer off).
PROCESS_READER = """
import gc
import os
import resource
import signal
import sys
def run(params, context):
    return {
        'pid': os.getpid(), 'nofile': list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        'stack': list(resource.getrlimit(resource.RLIMIT_STACK)),
        'itimers': [list(signal.getitimer(w)) for w in (signal.ITIMER_REAL,
                    signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)],
        'gc_callbacks': len(gc.callbacks),
        'std': [getattr(sys, name) is getattr(sys, '__' + name + '__') for name in
                ('stdin', 'stdout', 'stderr', 'displayhook', 'excepthook',
                 'unraisablehook', 'breakpointhook')],
    }
"""

PROCESS_PAYLOAD = """
import gc
import io
import resource
import signal
import sys
def run(params, context):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    resource.setrlimit(resource.RLIMIT_STACK, (1 << 20, hard))
    signal.setitimer(signal.ITIMER_VIRTUAL, 1000.0)
    gc.callbacks.append(lambda phase, info: None)
    sys.stdout = io.StringIO()
    sys.excepthook = sys.unraisablehook = sys.breakpointhook = lambda *a: None
    return {'planted': True}
"""

LOWERED_HARD_LIMIT_PAYLOAD = """
import resource
def run(params, context):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard - 1))
    return {'planted': True}
"""


def test_a_worker_puts_the_process_s_state_back_without_the_language_layer():
    """Lowered soft limits, an interval timer, a collector callback and `sys`'s streams and
    hooks do not outlive the execution that changed them: the next one on the same worker
    reads what the first one read."""
    before, planted, after = _settings_around(PROCESS_PAYLOAD, reader=PROCESS_READER)
    assert planted == {"planted": True}, planted
    assert after == before
    assert before["std"] == [True] * 7 and before["gc_callbacks"] == 0


def test_a_lowered_hard_limit_retires_the_worker():
    """A hard limit cannot be raised back: the worker that ran the execution retires,
    and a fresh one, with the limit it started with, runs the next."""
    before, planted, after = _settings_around(LOWERED_HARD_LIMIT_PAYLOAD, reader=PROCESS_READER)
    assert planted == {"planted": True}, planted
    assert after.pop("pid") != before.pop("pid"), "the worker with the lowered limit ran on"
    assert after == before


# ---------------------------------------------------------------------------------------------
# A violation, caught, then hidden behind another failure: the tripwire says an execution that
# touched something forbidden always ends as policy_violation.

MASKS = [
    pytest.param("    raise MemoryError('not really')\n", id="raise-MemoryError"),
    pytest.param(
        "    while True:\n        try:\n            log('x' * 10000)\n"
        "        except BaseException as overflow:\n            raise overflow\n",
        id="re-raise-the-log-overflow",
    ),
]


@pytest.mark.parametrize("mask", MASKS)
def test_caught_violation_cannot_pass_for_another_failure(sandbox, mask):
    """A violation the code caught, then disguised as another failure, is still reported
    as the violation."""
    code = (
        "import json\ndef run(params, context):\n    try:\n        import os\n"
        "    except Exception:\n        pass\n" + mask
    )
    with pytest.raises(corral.SandboxError) as caught:
        sandbox.execute_sync(code, timeout_ms=TIMEOUT_MS, limits=LIMITS)
    assert caught.value.type == "policy_violation", caught.value.type


# ---------------------------------------------------------------------------------------------
# Resource attacks: each ends in its documented error type, in bounded time, and the sandbox
# serves the next execution.


@dataclass(frozen=True)
class Attack:
    code: str
    expect: tuple[str, ...]
    limits: Limits = LIMITS
    timeout_ms: int = TIMEOUT_MS
    within_s: float = 8.0


def attack(id: str, code: str, expect: str | tuple[str, ...], **kwargs: Any) -> Any:
    expected = (expect,) if isinstance(expect, str) else expect
    return pytest.param(Attack(textwrap.dedent(code).lstrip("\n"), expected, **kwargs), id=id)


FAST_HEARTBEAT = {"heartbeat_interval_ms": 50, "heartbeat_timeout_ms": 400}

# fmt: off
RESOURCE_ATTACKS = [
    attack("huge-int-to-str", """
def run(params, context):
    return str(10 ** 5000)
""", "code_error"),
    attack("huge-power-then-str", """
def run(params, context):
    return str(7 ** 7 ** 9)
""", ("cpu_limit", "heartbeat_timeout", "timeout"),
        limits=Limits(max_memory_mb=64, max_cpu_ms=500, **FAST_HEARTBEAT)),
    attack("string-repetition-past-memory", """
def run(params, context):
    return len('a' * 10 ** 10)
""", "memory_limit"),
    # bytes(10**10) alone is untouched zero pages (it fits); the copy touches them all.
    attack("bytes-copy-past-memory", """
def run(params, context):
    return len(bytes(10 ** 10) + b'x')
""", "memory_limit"),
    attack("infinite-generator-into-list", """
import itertools
def run(params, context):
    return len(list(itertools.count()))
""", "memory_limit"),
    attack("catastrophic-regex-backtracking", """
import re
def run(params, context):
    return bool(re.match('(a+)+$', 'a' * 40 + 'b'))
""", ("heartbeat_timeout", "timeout"),
        limits=Limits(max_memory_mb=64, **FAST_HEARTBEAT), timeout_ms=2_000),
    attack("deep-recursion", """
def run(params, context):
    def down(n):
        return down(n + 1) + 1
    return down(0)
""", "code_error"),
    attack("busy-loop", """
def run(params, context):
    while True:
        pass
""", "cpu_limit", limits=Limits(max_memory_mb=64, max_cpu_ms=300)),
    attack("busy-loop-catching-everything", """
def run(params, context):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
""", "cpu_limit", limits=Limits(max_memory_mb=64, max_cpu_ms=300)),
    attack("pbkdf2-in-c", """
import hashlib
def run(params, context):
    return hashlib.pbkdf2_hmac('sha256', b'pw', b'salt', 10 ** 9).hex()
""", ("cpu_limit", "heartbeat_timeout", "timeout"),
        limits=Limits(max_memory_mb=64, max_cpu_ms=300, **FAST_HEARTBEAT)),
    attack("sleep-past-timeout", """
import time
def run(params, context):
    time.sleep(60)
""", "timeout", timeout_ms=500),
    attack("log-flood", """
def run(params, context):
    while True:
        log('x' * 1000)
""", "output_limit", limits=Limits(max_memory_mb=64, max_log_bytes=100_000)),
    attack("log-flood-catching-everything", """
def run(params, context):
    while True:
        try:
            log('x' * 1000)
        except BaseException:
            pass
""", ("output_limit", "cpu_limit"),
        limits=Limits(max_memory_mb=64, max_cpu_ms=1_000, max_log_bytes=100_000)),
    attack("print-flood", """
def run(params, context):
    while True:
        print('y' * 1000)
""", "output_limit", limits=Limits(max_memory_mb=64, max_log_bytes=100_000)),
    attack("huge-output", """
def run(params, context):
    return 'z' * 200_000
""", "output_limit", limits=Limits(max_memory_mb=64, max_output_bytes=100_000)),
    attack("unserialisable-output-set", """
def run(params, context):
    return {1, 2}
""", "code_error"),
    attack("unserialisable-output-module", """
import json
def run(params, context):
    return json
""", "code_error"),
    attack("circular-output", """
def run(params, context):
    loop = []
    loop.append(loop)
    return loop
""", "code_error"),
    attack("output-nested-past-the-depth-cap", """
def run(params, context):
    out = []
    for _ in range(100_000):
        out = [out]
    return out
""", "code_error"),
    attack("huge-exception-message", """
def run(params, context):
    raise ValueError('m' * 10 ** 7)
""", "code_error"),
]
# fmt: on


@pytest.mark.parametrize("attack", RESOURCE_ATTACKS)
def test_resource_attack_ends_in_its_type(sandbox, attack):
    """The attack ends as documented, in bounded time, and the sandbox is still usable."""
    started = time.monotonic()
    with pytest.raises(corral.SandboxError) as caught:
        sandbox.execute_sync(attack.code, timeout_ms=attack.timeout_ms, limits=attack.limits)
    elapsed = time.monotonic() - started
    assert caught.value.type in attack.expect, f"{caught.value.type}: {caught.value.message}"
    assert elapsed < attack.within_s, f"took {elapsed:.1f} s"
    assert len(caught.value.message) < 100_000
    # At once: a worker that could not stop its code says so in its answer and is replaced.
    follow_up = sandbox.execute_sync(
        "def run(params, context):\n    return params['n']\n", params={"n": 7}
    )
    assert follow_up.output == 7
