"""The language connector code may use: Python as people write it, with the refusals that
keep the sandbox's guards in place (attacks on these grants are in test_escapes.py)."""

from __future__ import annotations

import textwrap

import pytest

import corral
from corral import NodeSandbox
from corral.sandbox._policy import compile_connector

pytestmark = pytest.mark.timeout(120)


def run(sandbox: NodeSandbox, code: str) -> object:
    return sandbox.execute_sync(textwrap.dedent(code), timeout_ms=10_000).output


def refusal(sandbox: NodeSandbox, code: str) -> str:
    with pytest.raises(corral.PolicyViolation) as caught:
        sandbox.execute_sync(textwrap.dedent(code), timeout_ms=10_000)
    return caught.value.message


def test_augmented_assignment_evaluates_each_part_once(sandbox):
    """`obj[key()] += v` and `obj().attr += v` call key() and obj() once, as Python does."""
    output = run(
        sandbox,
        """
        calls = []
        class Box:
            def __init__(self):
                self.n = 1
        box = Box()
        def key():
            calls.append('key')
            return 'a'
        def holder():
            calls.append('holder')
            return box
        def run(params, context):
            d = {'a': 1}
            d[key()] += 10
            holder().n *= 5
            items = [1, 2, 3]
            items[1:] += [4]
            return [d, box.n, items, calls]
        """,
    )
    assert output == [{"a": 11}, 5, [1, 2, 3, 4], ["key", "holder"]]


def test_private_names_are_mangled_as_python_does(sandbox):
    """`self.__x` inside a class reads and writes `_Class__x`, and a subclass has its own."""
    output = run(
        sandbox,
        """
        class A:
            def __init__(self):
                self.__x = 'a'
            def a(self):
                return self.__x
        class B(A):
            def __init__(self):
                super().__init__()
                self.__x = 'b'
            def b(self):
                return self.__x
        def run(params, context):
            obj = B()
            return [obj.a(), obj.b(), sorted(vars(obj))]
        """,
    )
    assert output == ["a", "b", ["_A__x", "_B__x"]]


def test_closures_may_rebind_with_nonlocal(sandbox):
    output = run(
        sandbox,
        """
        def run(params, context):
            total = 0
            def add(n):
                nonlocal total
                total += n
            for n in range(2000):
                add(n)
            return total
        """,
    )
    assert output == sum(range(2000))


def test_str_format_reads_attributes_through_the_guards(sandbox):
    """format() and format_map() work, and a field cannot walk into a private attribute."""
    output = run(
        sandbox,
        """
        class User:
            def __init__(self):
                self.name = 'ada'
        def run(params, context):
            return ['{0.name} has {n:>3}'.format(User(), n=7), '{a[0]}'.format_map({'a': [1]})]
        """,
    )
    assert output == ["ada has   7", "1"]
    message = refusal(sandbox, "def run(params, context):\n    return '{0._x}'.format(params)\n")
    assert "`_x` of a dict object is off limits" in message


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        ("import json\ndef run(params, context):\n    return json.JSONDecoder()._x\n",
         "`_x` of a JSONDecoder object is off limits"),
        ("def run(params, context):\n    return type('X', (), {})\n",
         "type() takes one argument"),
        ("class A:\n    pass\ndef run(params, context):\n    return type(A)\n",
         "type() of a class is off limits"),
        ("def run(params, context):\n    return type(http)\n",
         "type() of corral's own"),
        ("class A:\n    pass\ndef run(params, context):\n    return A.__class__\n",
         "`__class__` is off limits"),
        ("def run(params, context):\n    return run.__globals__\n",
         "`__globals__` of a function object is off limits"),
        ("def run(params, context):\n    setattr(context, '__class__', dict)\n",
         "special attributes are Python's own"),
        ("import json\ndef run(params, context):\n    json.JSONDecoder.x = 1\n",
         "may not change type JSONDecoder"),
    ],
    ids=["foreign-private", "type-3", "metaclass", "corral-type", "class-of-class",
         "globals", "setattr-dunder", "foreign-class-write"],
)  # fmt: skip
def test_what_stays_refused_says_why(sandbox, code, needle):
    assert needle in refusal(sandbox, code)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("_getattr_ = 1\n", '"_getattr_" is reserved'),
        ("class A:\n    def __del__(self):\n        pass\n",
         "not among the special methods a connector class may define"),
        ("class A:\n    def __getattribute__(self, name):\n        pass\n",
         "not among the special methods a connector class may define"),
        ("def __init__(self):\n    pass\n", "define it inside a class"),
        ("def f(o):\n    o.__class__ = int\n", '"__class__" cannot be assigned'),
        ("def f(o):\n    o.__dict__ += {}\n", '"__dict__" cannot be assigned'),
        ("x = __builtins__\n", "special names are Python's own"),
    ],
    ids=["helper-name", "del", "getattribute", "method-outside-class", "class-write",
         "dunder-augassign", "builtins"],
)  # fmt: skip
def test_compile_refusals_name_the_rule(source, needle):
    _, error_type, message = compile_connector(source)
    assert error_type == "policy_violation"
    assert needle in message


def test_vars_of_a_foreign_object_is_a_copy_of_its_public_names(sandbox):
    output = run(
        sandbox,
        """
        import json
        def run(params, context):
            shown = vars(json)
            shown['loads'] = None
            return [sorted(shown) == sorted(n for n in dir(json) if not n.startswith('_')),
                    json.loads('1')]
        """,
    )
    assert output == [True, 1]


def test_decimal_context_changes_stay_in_their_execution(sandbox):
    """`getcontext().prec = 3` and its traps are allowed, and the next execution on the same
    worker starts from a fresh context."""
    changed = run(
        sandbox,
        """
        import decimal
        def run(params, context):
            decimal.getcontext().prec = 3
            decimal.getcontext().traps[decimal.Inexact] = True
            try:
                decimal.Decimal(1) / decimal.Decimal(3)
            except decimal.Inexact:
                return 'trapped'
        """,
    )
    fresh = run(
        sandbox,
        "import decimal\ndef run(params, context):\n"
        "    return str(decimal.Decimal(1) / decimal.Decimal(3))\n",
    )
    assert [changed, fresh] == ["trapped", "0." + "3" * 28]


def test_a_private_attribute_not_set_yet_gives_the_default(sandbox):
    """`getattr(self, "_cache", None)` and `hasattr(self, "_x")` on an own object whose
    attribute is not set yet: the default and False, not a refusal."""
    output = run(
        sandbox,
        """
        class Client:
            def token(self):
                if getattr(self, '_token', None) is None:
                    self._token = 'fresh'
                return self._token
        def run(params, context):
            client = Client()
            return [hasattr(client, '_token'), client.token(), hasattr(client, '_token')]
        """,
    )
    assert output == [False, "fresh", True]
