"""What connector code may say: RestrictedPython's compiler, widened to Python as people write it.

Child side (the zygote compiles; the child runs): nothing from the host side of corral.

RestrictedPython refuses every name that starts with `_`, augmented assignment to
attributes and items, and `nonlocal`. Connector code written as people write it needs all
three: `def __init__`, `self._token`, `counts[key] += 1`, a closure that counts. This
compiler allows them and keeps what the refusals protected:

- Names that start *and* end with `_` stay refused: RestrictedPython's helpers
  (`_getattr_`, `_write_`, ...) live in the globals under such names, and rebinding one
  would switch a guard off for the code that follows. `_` alone and `_private` are fine.
- A class body may define the special methods in `CLASS_METHODS`; `__del__` (it would run
  whenever the object is collected, maybe in a later execution) and `__getattribute__` are
  not among them.
- An attribute starting with `_` compiles; whether it may be read is decided when it is
  read (`Guards`): only on the connector's own objects. An attribute that starts and ends
  with `__` can never be written (`self.__class__ = ...`).
- `self.__secret` inside a class is mangled to `self._Class__secret` also when read, as
  Python does (RestrictedPython turns the read into a call with the name as a string,
  which Python would not mangle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from RestrictedPython.transformer import (
    FORBIDDEN_FUNC_NAMES,
    INSPECT_ATTRIBUTES,
    IOPERATOR_TO_STR,
    RestrictingNodeTransformer,
    copy_locations,
)

_OPERATORS = (
    "add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "divmod", "pow", "lshift",
    "rshift", "and", "xor", "or",
)  # fmt: skip

#: Special methods a connector's class body may define. Not `__del__` (it would run when
#: the object is collected, maybe in a later execution) nor `__getattribute__`.
CLASS_METHODS: frozenset[str] = frozenset(
    (
        *(f"__{name}__" for name in _OPERATORS),
        *(f"__r{name}__" for name in _OPERATORS),
        *(f"__i{name}__" for name in _OPERATORS if name != "divmod"),
        "__init__", "__new__", "__post_init__", "__init_subclass__", "__class_getitem__",
        "__set_name__", "__repr__", "__str__", "__format__", "__bytes__", "__hash__",
        "__bool__", "__dir__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
        "__len__", "__length_hint__", "__iter__", "__next__", "__reversed__", "__contains__",
        "__getitem__", "__setitem__", "__delitem__", "__missing__", "__getattr__",
        "__setattr__", "__delattr__", "__get__", "__set__", "__delete__", "__call__",
        "__enter__", "__exit__", "__neg__", "__pos__", "__abs__", "__invert__", "__complex__",
        "__int__", "__float__", "__index__", "__round__", "__trunc__", "__floor__", "__ceil__",
    )
)  # fmt: skip

#: Special names a class body may assign (not define as a method).
#: Not `__slots__`: a slot named `__del__` would be a finalizer.
CLASS_ATTRIBUTES: frozenset[str] = frozenset({"__match_args__"})

_AUG_OBJECT, _AUG_KEY = "_aug_object_", "_aug_key_"  # ends in `_`: no connector name clashes


def is_dunder(name: str) -> bool:
    """`__name__`-shaped: Python's own protocol names."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def is_reserved(name: str) -> bool:
    """A name connector code may not bind: `_x_`-shaped (RestrictedPython's helpers and
    Python's dunders), `__roles__` (Zope's), and print/builtins."""
    if name == "_":
        return False
    return (
        (name.startswith("_") and name.endswith("_"))
        or name.endswith("__roles__")
        or name in FORBIDDEN_FUNC_NAMES
    )


class ConnectorTransformer(RestrictingNodeTransformer):
    """RestrictedPython's transformer with the widening described in the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: list[str] = []  # the enclosing class bodies, innermost last
        self._in_class_body = False

    @contextmanager
    def _scope(self, class_name: str | None) -> Iterator[None]:
        saved = (list(self._classes), self._in_class_body)
        if class_name is not None:
            self._classes.append(class_name)
        self._in_class_body = class_name is not None
        try:
            yield
        finally:
            self._classes, self._in_class_body = saved

    def check_name(self, node: Any, name: str | None, allow_magic_methods: bool = False) -> None:
        if name is None or not is_reserved(name):
            return
        if allow_magic_methods and self._in_class_body and name in CLASS_METHODS:
            return
        if is_dunder(name):
            if self._in_class_body and allow_magic_methods:
                why = "it is not among the special methods a connector class may define"
            elif name in CLASS_METHODS:
                why = "it is a special method: define it inside a class"
            else:
                why = "special names are Python's own"
            self.error(node, f'"{name}" cannot be bound here: {why}')
        elif name.startswith("_") and name.endswith("_"):
            self.error(
                node,
                f'"{name}" is reserved: names that start and end with "_" belong to the '
                'sandbox; rename it (for example without the trailing "_")',
            )
        else:
            self.error(node, f'"{name}" is a reserved name.')

    def visit_Name(self, node: ast.Name) -> Any:
        if (
            isinstance(node.ctx, ast.Store | ast.Load)
            and self._in_class_body
            and (node.id in CLASS_ATTRIBUTES or node.id in CLASS_METHODS)
        ):  # `__hash__ = None`, `__radd__ = __add__`
            return node
        return super().visit_Name(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> Any:
        with self._scope(node.name):
            return super().visit_ClassDef(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        self.check_name(node, node.name, allow_magic_methods=True)
        self.check_function_argument_names(node)
        with self._scope(None), self.print_info.new_print_scope():  # still mangles
            node = self.node_contents_visit(node)
            self.inject_print_collector(node)
        return node

    def visit_Lambda(self, node: ast.Lambda) -> Any:
        with self._scope(None):
            return super().visit_Lambda(node)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> Any:
        """`nonlocal` binds a name of the enclosing function: nothing new is reached."""
        for name in node.names:
            self.check_name(node, name)
        return node

    def _mangled(self, name: str) -> str:
        """`name` as Python mangles a private name inside the innermost class."""
        if not self._classes or not name.startswith("__") or name.endswith("__"):
            return name
        owner = self._classes[-1].lstrip("_")
        return f"_{owner}{name}" if owner else name

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        name = self._mangled(node.attr)
        if name.endswith("__roles__") or name in INSPECT_ATTRIBUTES:
            self.error(node, f'"{name}" is a restricted name, that is forbidden to access.')
            return node
        if not isinstance(node.ctx, ast.Load) and is_dunder(name):
            self.error(node, f'"{name}" cannot be assigned or deleted: it is Python\'s own')
            return node
        node = self.node_contents_visit(node)
        if isinstance(node.ctx, ast.Load):
            call = ast.Call(
                func=ast.Name("_getattr_", ast.Load()),
                args=[node.value, ast.Constant(name)],
                keywords=[],
            )
            copy_locations(call, node)
            return call
        write = ast.Call(func=ast.Name("_write_", ast.Load()), args=[node.value], keywords=[])
        copy_locations(write, node.value)
        node.value, node.attr = write, name
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        """`obj.attr += v` and `obj[key] += v`, each part evaluated once, as Python does."""
        if isinstance(node.target, ast.Name):
            return super().visit_AugAssign(node)
        target = node.target
        obj = self.visit(target.value)
        value = self.visit(node.value)
        op = ast.Constant(IOPERATOR_TO_STR[type(node.op)])
        held = ast.Name(_AUG_OBJECT, ast.Load())
        statements: list[ast.stmt] = [
            ast.Assign(targets=[ast.Name(_AUG_OBJECT, ast.Store())], value=obj)
        ]
        write = ast.Call(func=ast.Name("_write_", ast.Load()), args=[held], keywords=[])
        if isinstance(target, ast.Attribute):
            name = self._mangled(target.attr)
            if name.endswith("__roles__") or name in INSPECT_ATTRIBUTES or is_dunder(name):
                self.error(node, f'"{name}" cannot be assigned: it is off limits')
                return node
            current: ast.expr = ast.Call(
                func=ast.Name("_getattr_", ast.Load()),
                args=[held, ast.Constant(name)],
                keywords=[],
            )
            store: ast.expr = ast.Attribute(value=write, attr=name, ctx=ast.Store())
        else:
            key = self.visit(_as_expression(target.slice))
            statements.append(ast.Assign(targets=[ast.Name(_AUG_KEY, ast.Store())], value=key))
            key_held = ast.Name(_AUG_KEY, ast.Load())
            current = ast.Call(
                func=ast.Name("_getitem_", ast.Load()), args=[held, key_held], keywords=[]
            )
            store = ast.Subscript(value=write, slice=key_held, ctx=ast.Store())
        statements.append(
            ast.Assign(
                targets=[store],
                value=ast.Call(
                    func=ast.Name("_inplacevar_", ast.Load()),
                    args=[op, current, value],
                    keywords=[],
                ),
            )
        )
        for statement in statements:
            ast.copy_location(statement, node)
            ast.fix_missing_locations(statement)  # the new nodes take the statement's line
        return statements


def _as_expression(key: ast.expr) -> ast.expr:
    """A subscript's key as a value: `a[1:2]`'s slice becomes `slice(1, 2, None)`."""
    if not isinstance(key, ast.Slice):
        return key
    parts = [
        ast.Constant(None) if part is None else part for part in (key.lower, key.upper, key.step)
    ]
    return ast.Call(func=ast.Name("slice", ast.Load()), args=parts, keywords=[])
