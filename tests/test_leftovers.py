"""Nothing one execution on a warm worker writes into the interpreter reaches the next.

Two executions on one worker (a pool of one): the first writes, through allowed
connector code, into a structure the interpreter keeps (an enum's value map, the
codec cache, an ABC's cache, re's cache...), the second must not find it, by presence
or by timing. With the language layer switched off (corral's test-only switch), the
same worker process runs `_leftovers` itself: every structure on its list is written
and must be reset, and the census of the running worker must find nothing the list
leaves out.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_workers import one_worker, worker_pids

import corral
from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.sandbox import _leftovers

_TIMED = """
import time
{imports}
def op(k):
{body}
def first(k):
    started = time.perf_counter()
    op(k)
    return time.perf_counter() - started
def run(params, context):
    if params["write"]:
        for k in params["known"]:
            op(k)
        return None
    first(params["warm"])  # the first call of an execution pays for more than its key
    known, fresh, again = [], [], []
    for k, f in zip(params["known"], params["fresh"]):
        known.append(first(k))
        fresh.append(first(f))
        again.append(first(f))
    return [known, fresh, again]
"""

_FLAGS = ("X", "A", "U", "S", "M", "I", "NOFLAG")
_FLAG_PAIRS = [[a, b] for i, a in enumerate(_FLAGS) for b in _FLAGS[i + 1 :]]
#: name -> (imports, body of op(k), keys of attempt n: (known, fresh)).
_CASES = {
    "enum value map (Flag pseudo-members)": (
        "import re",
        "    return getattr(re, k[0]) | getattr(re, k[1])",
        lambda n: (_FLAG_PAIRS[7 * n : 7 * n + 4], _FLAG_PAIRS[7 * n + 3 : 7 * n + 7]),
    ),
    "codec cache, unknown name": (
        "",
        "    try:\n        b'x'.decode(k)\n    except LookupError:\n        pass",
        lambda n: (
            [f"corral-leftover-{n}-known-{i}" for i in range(5)],
            [f"corral-leftover-{n}-fresh-{i}" for i in range(5)],
        ),
    ),
    "codec cache and lazily imported codec modules": (
        "",
        "    return 'x'.encode(k)",
        lambda n: (
            ["cp037", *["shift_jis", "euc_kr", "big5", "cp1252", "koi8_r", "mac_roman"][n::3][:2]],
            ["cp037", *["gb2312", "euc_jp", "cp949", "cp1250", "koi8_u", "mac_greek"][n::3][:2]],
        ),
    ),
    "re cache": (
        "import re",
        "    return re.compile(k)",
        lambda n: (
            [f"corral-(a|b)+-{n}-known-{i}[xyz]*" for i in range(5)],
            [f"corral-(a|b)+-{n}-fresh-{i}[xyz]*" for i in range(5)],
        ),
    ),
    # No timing case for the ABC caches: connector code reaches no ABC but ChainMap (mro()
    # is refused), whose cached and uncached answers differ by a few microseconds, too little
    # to tell apart on a busy machine; test_every_resettable_structure_is_reset_in_place writes
    # an ABC cache entry and finds it gone.
    "urlsplit's lru cache": (
        "import urllib.parse",
        "    return urllib.parse.urlsplit(k)",
        lambda n: (
            [f"https://known-{n}-{i}.example/p?q=1#f" for i in range(5)],
            [f"https://fresh-{n}-{i}.example/p?q=1#f" for i in range(5)],
        ),
    ),
}


@pytest.fixture
def workers(clean_env: pytest.MonkeyPatch) -> Iterator[NodeSandbox]:
    """A worker sandbox with a pool of one (consecutive executions share a worker)."""
    with one_worker(clean_env) as sandbox:
        yield sandbox


@pytest.fixture
def plain_worker(clean_env: pytest.MonkeyPatch) -> Iterator[NodeSandbox]:
    """One worker running connector code as plain Python (the test-only switch): the code
    can reach `_leftovers` in the worker process itself."""
    clean_env.setenv("CORRAL_WORKER_POOL_SIZE", "1")
    with NodeSandbox(
        executor="worker",
        limits=Limits(max_memory_mb=128),
        settings=load_settings(),
        _unsafe_layers_off={"language"},
    ) as sandbox:
        yield sandbox


@pytest.mark.parametrize("case", list(_CASES))
def test_the_next_execution_cannot_time_what_the_last_one_cached(workers, case):
    """The first lookup of what the previous execution looked up costs as much as the
    first lookup of something never looked up (and not as little as a second one)."""
    imports, body, keys = _CASES[case]
    code = _TIMED.format(imports=imports, body=body)
    workers.execute_sync("def run(params, context):\n    return 1\n")
    (pid,) = worker_pids()
    verdicts = []
    for attempt in range(3):  # a busy host can blur one attempt; fresh keys each time
        known, fresh = keys(attempt)
        warm, known, fresh = known[0], known[1:], fresh[1:]
        workers.execute_sync(code, params={"write": True, "known": known})
        result = workers.execute_sync(
            code, params={"write": False, "known": known, "fresh": fresh, "warm": warm}
        ).output
        first_known, first_fresh, second_fresh = map(statistics.median, result)
        powerful = first_fresh > 2.5 * second_fresh  # the cache makes a difference at all
        midpoint = (first_fresh * second_fresh) ** 0.5
        verdicts.append((powerful, first_known > midpoint, result))
        if powerful and first_known > midpoint:
            break
    assert any(powerful for powerful, _, _ in verdicts), f"no timing difference: {verdicts}"
    assert any(p and unseen for p, unseen, _ in verdicts), f"cached across: {verdicts}"
    assert worker_pids() == {pid}  # nothing retired the worker: it was reset in place


def test_allowed_lazy_imports_do_not_grow_the_worker(workers):
    """What allowed functions import on first use was imported ahead: using it leaves
    sys.modules as it was, so the worker is neither changed nor retired."""
    code = (
        "import re, urllib.parse, hashlib, base64\n"
        "def run(params, context):\n"
        "    re.compile(r'\\N{LATIN SMALL LETTER A}')\n"
        "    urllib.parse.urlsplit('http://\\uff21.example/')\n"
        "    hashlib.new('blake2b').hexdigest()\n"
        "    base64.b85encode(b'x'); base64.a85decode(base64.a85encode(b'x'))\n"
        "    urllib.parse.unquote_to_bytes('%41')\n"
        "    for name in ('idna', 'punycode', 'utf-7', 'cp037', 'hz', 'iso2022_jp', 'johab'):\n"
        "        'a'.encode(name)\n"
        "    return 1\n"
    )
    workers.execute_sync("def run(params, context):\n    return 1\n")
    (pid,) = worker_pids()
    for _ in range(2):
        assert workers.execute_sync(code).output == 1
    assert worker_pids() == {pid}


_ORDINARY = [
    "def run(params, context):\n    print('hello', params)\n    log('x', level='warn')\n"
    "    return {'n': len(params)}\n",
    "import json, re, base64, hashlib, hmac\ndef run(params, context):\n"
    "    sig = hmac.new(b'k', json.dumps(params).encode(), hashlib.sha256).hexdigest()\n"
    "    return [sig, re.findall(r'(?im)^a', 'a\\nA'), base64.b64encode(b'x').decode()]\n",
    "import datetime, decimal\ndef run(params, context):\n"
    "    d = datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc)\n"
    "    return [d.isoformat(), str(decimal.Decimal('1.10') * 3)]\n",
    "class Page:\n    def __init__(self, items):\n        self.items = items\n"
    "def run(params, context):\n    try:\n        raise ValueError('no')\n"
    "    except ValueError as exc:\n        return [Page([1]).items, str(exc)]\n",
    "import collections, functools, itertools, uuid, urllib.parse\n"
    "def run(params, context):\n"
    "    c = collections.Counter('abca').most_common(1)\n"
    "    q = urllib.parse.urlencode({'a': 1, 'b': 'x y'})\n"
    "    u = str(uuid.uuid5(uuid.NAMESPACE_DNS, 'x'))\n"
    "    return [c, q, u, list(itertools.islice('ab', 1))]\n",
    "def run(params, context):\n    raise RuntimeError('a failing connector')\n",
]


def test_ordinary_executions_keep_their_worker(workers):
    """Everyday connector code (each source compiled in the worker) changes nothing the
    reset must retire the worker for."""
    workers.execute_sync("def run(params, context):\n    return 1\n")
    (pid,) = worker_pids()
    for _ in range(2):
        for code in _ORDINARY:
            with contextlib.suppress(corral.CodeError):
                workers.execute_sync(code, params={"a": 1})
    assert worker_pids() == {pid}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_huge_unknown_encoding_name_does_not_grow_the_worker(workers):
    """A 3 MiB unknown encoding name used to stay in encodings' cache: 3 MiB more each
    execution until the worker was retired."""
    code = (
        "def run(params, context):\n"
        "    name = 'corral-' + str(params['n']) + 'x' * (3 << 20)\n"
        "    try:\n        b'x'.decode(name)\n    except LookupError:\n        return 'unknown'\n"
    )
    assert workers.execute_sync(code, params={"n": 0}).output == "unknown"
    (pid,) = worker_pids()
    sizes = []
    for n in range(1, 11):
        assert workers.execute_sync(code, params={"n": n}).output == "unknown"
        sizes.append(_rss_kb(pid))
    assert worker_pids() == {pid}
    assert sizes[-1] - sizes[0] < 3 << 10, f"the worker grew: {sizes} kB"


_STRUCTURES = """
import os
def run(params, context):
    from corral.sandbox import _leftovers
    watch = _leftovers.WATCH
    return {
        "pid": os.getpid(),
        "uncovered": _leftovers.uncovered(),
        "rebound": sorted(
            name for name in _leftovers.rebound_globals()
            if name.rpartition(".")[0] in _leftovers.REACHED
        ),
        "listed": list(_leftovers.REBOUND_GLOBALS),
        "watched": sorted(watch.names()),
        "checked": watch.rebound,
        "changed": watch.changed(),
    }
"""


@pytest.mark.timeout(120)
def test_the_list_is_complete_in_a_running_worker(plain_worker):
    """The census, run in the worker process, finds nothing the rules leave out, and every
    global a function of a reached module rebinds is checked."""
    result = plain_worker.execute_sync(_STRUCTURES, timeout_ms=60_000).output
    assert result["uncovered"] == {}
    assert set(result["rebound"]) <= set(result["listed"])
    assert set(result["rebound"]) <= set(result["checked"])
    assert result["changed"] == []
    assert len(result["watched"]) > 50  # the census found the structures at all


_WRITE_ALL = """
import abc, codecs, collections, os, sys
SENTINEL = "corral-leftover-sentinel"
def write(obj):
    if isinstance(obj, collections.abc.MutableMapping):
        obj[SENTINEL] = SENTINEL
    elif isinstance(obj, collections.abc.MutableSet):
        obj.add(SENTINEL)
    elif isinstance(obj, (list, collections.deque)):
        obj.append(SENTINEL)
    else:
        return False
    return True
def holds(obj):
    try:
        return SENTINEL in obj
    except TypeError:
        return False
def run(params, context):
    from corral.sandbox import _leftovers
    import _abc
    watch = _leftovers.WATCH
    structures = {name: (obj, action) for name, obj, action in watch.structures}
    resettable = [name for name, (obj, action) in structures.items()
                  if action in ("restore", "clear")]
    mapping = collections.ChainMap.mro()[2]
    if params["write"]:
        try:
            b"x".decode(SENTINEL)  # before a sentinel lands in encodings' cache itself
        except LookupError:
            pass
        written = []
        for name in resettable:
            obj, action = structures[name]
            if isinstance(obj, _leftovers._LRU):
                obj.cache_info()  # a functools cache: filled by a call with a new key
                try:
                    obj(SENTINEL)
                except Exception:
                    pass
                if obj.cache_info().currsize:
                    written.append(name)
            elif write(obj):
                written.append(name)
        for module, attr in (g.rpartition(".")[::2] for g in watch.rebound):
            if attr in ("WATCH", "_settings_baseline", "_process_baseline"):
                continue  # the reset itself
            vars(sys.modules[module])[attr] = SENTINEL
            written.append("global:" + module + "." + attr)
        issubclass(memoryview, mapping)
        return {"pid": os.getpid(), "written": written}
    left = [name for name in resettable
            if holds(structures[name][0])
            or (isinstance(structures[name][0], _leftovers._LRU)
                and structures[name][0].cache_info().currsize)]
    left += ["global:" + g for g in watch.rebound
             if vars(sys.modules[g.rpartition(".")[0]]).get(g.rpartition(".")[2]) == SENTINEL]
    import encodings
    if SENTINEL in encodings._cache:
        left.append("encodings._cache")
    if any(ref() is memoryview for ref in _abc._get_dump(mapping)[2]):
        left.append("abc negative cache")
    return {"pid": os.getpid(), "left": left, "changed": watch.changed(),
            "dirty": watch.codecs_dirty}
"""


def test_every_resettable_structure_is_reset_in_place(plain_worker):
    """Every structure the reset restores or clears, and every rebindable global, written
    by one execution, is back to its baseline in the next, on the same worker."""
    written = plain_worker.execute_sync(_WRITE_ALL, params={"write": True}).output
    assert len(written["written"]) > 20
    after = plain_worker.execute_sync(_WRITE_ALL, params={"write": False}).output
    assert after["pid"] == written["pid"]  # reset in place, not by a retirement
    assert after["left"] == []
    assert after["changed"] == []
    assert after["dirty"] is False


_RETIRES = """
import collections
SENTINEL = "corral-leftover-sentinel"
def run(params, context):
    from corral.sandbox import _leftovers
    watch = _leftovers.WATCH
    missed = []
    for name, obj, action in watch.structures:
        if action != "retire":
            continue
        if isinstance(obj, collections.abc.MutableMapping):
            try:
                obj[SENTINEL] = SENTINEL
            except TypeError:  # os.environb: bytes only
                continue
            caught = watch.reset() is False
            del obj[SENTINEL]
        elif isinstance(obj, collections.abc.MutableSet):
            obj.add(SENTINEL)
            caught = watch.reset() is False
            obj.discard(SENTINEL)
        elif isinstance(obj, (list, collections.deque)):
            obj.append(SENTINEL)
            caught = watch.reset() is False
            obj.pop()
        else:
            continue
        if not caught or watch.reset() is not True:
            missed.append(name)
    return {"missed": missed, "count": sum(a == "retire" for _, _, a in watch.structures)}
"""


def test_every_watched_structure_that_cannot_be_put_back_retires_the_worker(plain_worker):
    """A change to any structure the reset cannot restore makes it say: retire."""
    result = plain_worker.execute_sync(_RETIRES).output
    assert result["count"] > 20
    assert result["missed"] == []


def test_a_module_imported_during_an_execution_retires_the_worker(plain_worker):
    """sys.modules cannot be put back: the worker that grew it is replaced before the
    next execution, which does not see the module."""
    code = (
        "import os, sys, types\n"
        "def run(params, context):\n"
        "    seen = 'corral_leftover_module' in sys.modules\n"
        "    if params['write']:\n"
        "        sys.modules['corral_leftover_module'] = types.ModuleType('m')\n"
        "    return [os.getpid(), seen]\n"
    )
    first, _ = plain_worker.execute_sync(code, params={"write": True}).output
    second, seen = plain_worker.execute_sync(code, params={"write": False}).output
    assert seen is False and second != first


def test_every_rule_gives_a_known_action_and_a_reason():
    """The explicit list: each entry names how it is reset, or why it need not be."""
    for pattern, action, why in _leftovers.RULES:
        assert action in _leftovers._STRENGTH, pattern
        assert len(why) > 10, pattern
