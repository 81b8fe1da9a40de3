"""Polling triggers: run a trigger, pick the items it has not returned before, remember them.

Host side (DESIGN §8 `dedupe`). A trigger runs like any connector call
(bespoke handler, or the generic path under the flag, in NodeSandbox) and
returns items: its value, or the generic response's body, or the list the
trigger's `items` JSONPath names there. Each item has a key (`dedupe.key`)
and, with strategy `cursor`, a cursor (`dedupe.cursor`). An item is new when
its key is not in the trigger's seen set and, with a cursor, its cursor is not
older than the stored one. `dedupe.param` receives the stored cursor on the
next poll, so the API is asked only for what is newer.

Delivery is at least once, in two steps: `poll` reads and changes nothing;
`commit` records the keys and the advanced cursor once the caller has handed
the items on (enqueued their runs). A caller that dies in between polls the
same items again, so it derives each run's id from `TriggerItem.key`: the
runtime's idempotency then keeps an item from running twice. The first poll
of a trigger is a baseline: what the API lists already is recorded, not
delivered (`deliver_existing=True` delivers it).
"""

from __future__ import annotations

import datetime
import decimal
import json
import re
from dataclasses import dataclass, field
from typing import Any

from corral._exceptions import CodeError, InvalidInput
from corral.executors import IntegrationManager, Operation
from corral.executors._schema import compile_jsonpath
from corral.runtime._canonical import canonical_digest
from corral.runtime.store import Store

#: The seen keys' lifetime when the caller names none (CORRAL_TRIGGER_SEEN_TTL_S's default).
DEFAULT_SEEN_TTL_S = 30 * 86_400
_STATE_PREFIX = "trigger:"
_NUMERIC = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_NUMBERS = (int, float, decimal.Decimal)


@dataclass(frozen=True)
class TriggerItem:
    """One item a trigger returned, with its dedupe key and its cursor (None without one)."""

    key: str
    cursor: Any
    value: Any


@dataclass(frozen=True)
class TriggerPoll:
    """What one poll found; `new` are the items to deliver, in the order they came."""

    app: str
    trigger: str
    state: str  # the store key of this trigger's cursor and seen set
    new: list[TriggerItem]
    returned: list[TriggerItem] = field(repr=False)
    cursor_before: Any
    cursor: Any  # the cursor once this poll is committed
    baseline: bool  # the trigger's first poll: items recorded, not delivered
    executor: str
    fallback_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """The poll as JSON: the new items' keys and values, the cursor, the counts."""
        return {
            "app": self.app, "trigger": self.trigger, "baseline": self.baseline,
            "returned": len(self.returned), "cursor_before": self.cursor_before,
            "cursor": self.cursor, "executor": self.executor,
            "new": [{"key": item.key, "item": item.value} for item in self.new],
        }  # fmt: skip


class TriggerPoller:
    """Polls triggers through IntegrationManager, keeping cursors and seen keys in the store."""

    def __init__(
        self,
        integrations: IntegrationManager,
        store: Store,
        *,
        seen_ttl_s: int = DEFAULT_SEEN_TTL_S,
    ) -> None:
        self.integrations = integrations
        self.store = store
        self.seen_ttl_s = seen_ttl_s

    async def poll(
        self,
        app: str,
        trigger: str,
        params: dict[str, Any] | None = None,
        connection: dict[str, Any] | None = None,
        *,
        state: str | None = None,
        deliver_existing: bool = False,
        timeout_ms: int | None = None,
    ) -> TriggerPoll:
        """Run the trigger once and say which items are new; records nothing (`commit` does).

        `state` names the trigger's stored cursor and seen keys (the scheduler passes the
        workflow's id); by default they belong to this app, trigger, params and connection
        (baseUrl and credentials: two accounts of one API list different items). A caller
        that rotates credentials passes `state`, or the next poll is a baseline again.
        Raises the SandboxError the call ended with; CodeError when what it returned holds
        no list of items; InvalidInput for a function that is not a trigger.
        """
        operation = self.integrations.framework.connector(app).operation(trigger)
        if operation.kind != "trigger":
            raise InvalidInput(f"{operation.app}.{operation.id} is an action, not a trigger")
        params = dict(params or {})
        state = _STATE_PREFIX + (state or canonical_digest([
            operation.app, operation.id, params, (connection or {}).get("baseUrl"),
            (connection or {}).get("credentials"),
        ]))  # fmt: skip
        stored = await self.store.get_json(state)
        cursor_before = (stored or {}).get("cursor")
        dedupe = operation.dedupe or {}
        done = await self.integrations.execute(
            operation.app, operation.id, _with_cursor(operation, params, cursor_before),
            connection, timeout_ms=timeout_ms,
        )  # fmt: skip
        body = done.output if done.executor == "bespoke" else (done.output or {}).get("data")
        returned = [_item(operation, value) for value in _items(operation, body)]
        cursor = cursor_before
        for item in returned:
            if item.cursor is not None and (cursor is None or _older(cursor, item.cursor)):
                cursor = item.cursor
        fresh = [
            item for item in returned
            if dedupe.get("strategy") != "cursor" or cursor_before is None
            or item.cursor is None or not _older(item.cursor, cursor_before)
        ]  # fmt: skip
        unseen = set(await self.store.unseen(state, [item.key for item in fresh]))
        new, keys = [], set()
        for item in fresh:
            if item.key in unseen and item.key not in keys:  # the same item twice: once
                new.append(item)
                keys.add(item.key)
        baseline = stored is None and not deliver_existing
        return TriggerPoll(
            app=operation.app, trigger=operation.id, state=state,
            new=[] if baseline else new, returned=returned, cursor_before=cursor_before,
            cursor=cursor, baseline=baseline, executor=done.executor,
            fallback_reason=done.fallback_reason,
        )  # fmt: skip

    async def commit(self, poll: TriggerPoll) -> None:
        """Record what `poll` returned as seen and advance its cursor: its items are not
        new again. Call it once the new items were handed on."""
        await self.store.add_seen(
            poll.state, [item.key for item in poll.returned], ttl_s=self.seen_ttl_s
        )
        await self.store.put_json(poll.state, {"cursor": poll.cursor})


def _with_cursor(operation: Operation, params: dict[str, Any], cursor: Any) -> dict[str, Any]:
    """`params` with the stored cursor in `dedupe.param`, unless set or not acceptable."""
    name = (operation.dedupe or {}).get("param")
    if name is None or cursor is None or name in params:
        return params
    candidate = {**params, name: cursor}
    try:
        operation.validate(candidate)
    except InvalidInput:  # e.g. a numeric cursor for a date-time param: ask for everything
        return params
    return candidate


def _items(operation: Operation, body: Any) -> list[Any]:
    """The list of items in what the trigger returned (`items`, default the value itself).

    A path ending in `[*]` (`$.data[*]`) names each item: its matches are the items, none
    when the lists it goes through are empty. Any other path names the list itself.
    """
    path = operation.items or "$"
    found = [match.value for match in compile_jsonpath(path).find(body)]
    if path.endswith("[*]"):
        lists = [match.value for match in compile_jsonpath(path[:-3]).find(body)]
        if found or (lists and all(isinstance(value, list) for value in lists)):
            return found
    elif len(found) == 1 and isinstance(found[0], list):
        return found[0]
    elif len(found) > 1:
        return found
    shape = type(body).__name__ if body is not None else "null"
    raise CodeError(
        f"{operation.app}.{operation.id} returned {shape} with no list of items at {path!r}; "
        "a trigger returns a list, or names where its list is with `items`"
    )


def _item(operation: Operation, value: Any) -> TriggerItem:
    dedupe = operation.dedupe or {}
    key = _first(dedupe.get("key"), value)
    cursor = _first(dedupe.get("cursor"), value)
    if key is None:  # nothing to tell it by but itself: the same content is the same item
        key = "sha256:" + canonical_digest(value)
    elif not isinstance(key, str):
        key = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return TriggerItem(key=key, cursor=cursor, value=value)


def _first(path: str | None, value: Any) -> Any:
    if path is None:
        return None
    found = compile_jsonpath(path).find(value)
    return found[0].value if found else None


def _older(a: Any, b: Any) -> bool:
    """Whether cursor `a` comes before cursor `b`: numbers by value (numbers sent as
    strings, `"100"`, too), ISO 8601 times as instants, other strings in order; values that
    do not compare are not older."""
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    a, b = _number(a), _number(b)
    if isinstance(a, _NUMBERS) and isinstance(b, _NUMBERS):
        return a < b
    if isinstance(a, str) and isinstance(b, str):
        times = _instant(a), _instant(b)
        if times[0] is not None and times[1] is not None:
            return times[0] < times[1]
        return a < b
    return False


def _number(value: Any) -> Any:
    """`value`, or the number a numeric string spells (`"100"`, `"-2.5"`)."""
    if isinstance(value, str) and _NUMERIC.fullmatch(value):
        return decimal.Decimal(value)
    return value


def _instant(text: str) -> datetime.datetime | None:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
