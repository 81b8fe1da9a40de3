"""The language layer's data: module views, compile classification and the compile cache."""

from __future__ import annotations

import types

import pytest

from corral.config import DEFAULT_ALLOWED_IMPORTS, SAFE_MODULES
from corral.sandbox._policy import CompileCache, ImportPolicy, compile_connector

MODULE_DUNDERS = {"__name__", "__doc__", "__package__", "__loader__", "__spec__", "__getattr__"}


@pytest.fixture(scope="module")
def views() -> dict[str, types.ModuleType]:
    return ImportPolicy(DEFAULT_ALLOWED_IMPORTS).fresh_views()


def test_views_hold_no_modules_and_no_private_names(views):
    """No attribute of a view is a module or starts with '_' (no uuid.os, json.codecs, ...)."""
    for name, view in views.items():
        for attr, value in vars(view).items():
            if attr in MODULE_DUNDERS:
                continue
            assert not attr.startswith("_"), f"{name}.{attr}"
            if isinstance(value, types.ModuleType):
                assert f"{name}.{attr}" in views, f"{name}.{attr} leaks a module"


@pytest.mark.parametrize(
    "route",
    ["uuid.os", "json.codecs", "collections._sys", "re.copyreg", "string.Formatter",
     "uuid.getnode", "time.tzset", "base64.binascii", "hashlib.__builtins__"],
)  # fmt: skip
def test_known_routes_back_to_the_host_are_cut(views, route):
    """Attribute walks that lead from an allowed module back to the host are absent."""
    module, attr = route.split(".", 1)
    real = __import__(module)
    assert hasattr(real, attr) or attr == "__builtins__"  # the route exists on the real module
    assert attr not in vars(views[module])


def test_dotted_modules_get_a_package_view(views):
    """`import urllib.parse` binds a package view that holds only the allowed submodule."""
    assert views["urllib"].parse is views["urllib.parse"]
    assert not hasattr(views["urllib"], "request")


def test_views_are_fresh_each_time():
    """Two calls give distinct view objects: nothing one execution stores reaches another."""
    policy = ImportPolicy(["json"])
    assert policy.fresh_views()["json"] is not policy.fresh_views()["json"]


def test_views_show_exactly_their_allowlist():
    """A view holds the listed attributes its module has, and nothing else."""
    views = ImportPolicy(SAFE_MODULES).fresh_views()
    for name, listed in SAFE_MODULES.items():
        shown = {attr for attr in vars(views[name]) if not attr.startswith("__")}
        assert shown <= set(listed.split()), name
        assert len(shown) >= len(listed.split()) - 3, f"{name}: most listed names should exist"


@pytest.mark.parametrize(
    "route",
    ["functools.update_wrapper", "functools.singledispatch",
     "collections.UserString", "time.clock_settime", "time.tzset", "base64.main",
     "uuid.uuid1", "string.Formatter", "json.load"],
)  # fmt: skip
def test_known_dangerous_callables_are_not_shown(route):
    """Callables that copy chosen attributes, eval strings or touch the host are not in views."""
    module, attr = route.split(".")
    assert attr not in SAFE_MODULES[module].split()


@pytest.mark.parametrize(
    ("source", "error_type"),
    [
        ("def run(p, c):\n    return 1\n", None),
        ("def run(p, c)\n    return 1\n", "code_error"),
        ("def run(p, c):\n    p.__class__ = 1\n", "policy_violation"),
        ("def run(p, c):\n    exec('1')\n", "policy_violation"),
        ("x = (" * 500 + ")" * 500, "code_error"),
    ],
    ids=["ok", "syntax", "dunder", "exec", "deep-nesting"],
)
def test_compile_classifies_failures(source, error_type):
    """Invalid Python is code_error; valid Python the policy forbids is policy_violation."""
    code, kind, message = compile_connector(source)
    assert kind == error_type
    assert (code is None) == (error_type is not None)
    assert bool(message) == (error_type is not None)


def test_compile_cache_compiles_each_source_once():
    """A repeated source is served from the cache; the least recently used is evicted."""
    cache = CompileCache(size=2, max_bytes=1 << 20, filename="<connector>")
    first = cache.get("def run(p, c):\n    return 1\n")
    assert cache.get("def run(p, c):\n    return 1\n") is first
    cache.get("def run(p, c):\n    return 2\n")
    cache.get("def run(p, c):\n    return 3\n")
    assert cache.get("def run(p, c):\n    return 1\n") is not first


def test_compile_cache_is_bounded_in_bytes():
    """Sources past the byte budget evict older ones, and one larger than it is not kept."""
    cache = CompileCache(size=100, max_bytes=100, filename="<connector>")
    small = "x = 1\n" * 10  # 60 bytes
    kept = cache.get(small)
    cache.get("y = 2\n" * 10)  # 60 more: the first goes
    assert cache.get(small) is not kept
    huge = "z = 3\n" * 50  # 300 bytes: compiled, never cached
    assert cache.get(huge) is not cache.get(huge)


def test_views_hold_no_mutable_containers():
    """Nothing a view shows (or a class in it) is a container one execution could fill for the
    next one in a long-lived worker."""
    for name, view in ImportPolicy(SAFE_MODULES).fresh_views().items():
        for attr, value in vars(view).items():
            if attr.startswith("_"):
                continue
            reachable = [(f"{name}.{attr}", value)]
            if isinstance(value, type):
                reachable += [(f"{name}.{attr}.{a}", getattr(value, a, None))
                              for a in dir(value) if not a.startswith("_")]  # fmt: skip
            for path, item in reachable:
                assert not isinstance(item, dict | list | set | bytearray), path


def test_several_refusals_read_as_one_sentence_each():
    """Compile refusals are joined with '; ' and no stray '.;' between them."""
    _, error_type, message = compile_connector("_x_ = 1\n_y_ = 2\n")
    assert error_type == "policy_violation"
    assert ".;" not in message
    assert message.startswith('Line 1: "_x_" is reserved') and "; Line 2: " in message
