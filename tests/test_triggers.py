"""Polling triggers end to end (DESIGN §8 `dedupe`): TriggerPoller over a catalog of the
test's own, a real NodeSandbox, the real store (SQLite, and Redis) and a real HTTP server on
127.0.0.1 whose list of items each test changes between polls."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS, send_json, serving

import corral
from corral import FLAGS, Limits, NodeSandbox
from corral.config import load_settings
from corral.executors import ConnectorFramework, IntegrationManager
from corral.runtime import RedisStore, Store, TriggerPoll, TriggerPoller, open_store

APP = "feed"

CURSORED = {"strategy": "cursor", "key": "$.id", "cursor": "$.updated_at"}
CONNECTOR = {
    "id": APP,
    "name": "Test feed",
    "auth": {"type": "none"},
    "actions": [{"id": "ping", "method": "GET", "endpoint": "/entries"}],
    "triggers": [
        # bespoke: the handler returns the list itself
        {"id": "new_entries", "method": "GET", "endpoint": "/entries",
         "params": {"type": "object", "properties": {"since": {"type": "string"}}},
         "dedupe": {**CURSORED, "param": "since"}},
        {"id": "by_key", "dedupe": {"strategy": "key", "key": "$.id", "cursor": "$.updated_at"}},
        {"id": "anything"},  # no dedupe at all: items are told apart by their content
        # bespoke, returning the whole body: `items` names the list in it
        {"id": "numbered", "items": "$.entries",
         "params": {"type": "object", "properties": {"after": {"type": "integer"}}},
         "dedupe": {"strategy": "cursor", "key": "$.id", "cursor": "$.seq", "param": "after"}},
        {"id": "broken"},
        # generic only (no handler function): the generic response's body, `items` in it
        {"id": "listed", "method": "GET", "endpoint": "/entries", "items": "$.entries",
         "params": {"type": "object", "properties": {"since": {"type": "string"}}},
         "dedupe": {**CURSORED, "param": "since"}},
        {"id": "listed_each", "method": "GET", "endpoint": "/entries", "items": "$.entries[*]",
         "dedupe": CURSORED},
    ],
}  # fmt: skip

HANDLERS = """
def fetch(params, context):
    response = http.get(context["connection"]["baseUrl"] + "/entries", params=params or None)
    response.raise_for_status()
    return response.json()


def new_entries(params, context):
    return fetch(params, context)["entries"]


def by_key(params, context):
    return fetch(params, context)["entries"]


def anything(params, context):
    return fetch(params, context)["entries"]


def numbered(params, context):
    return fetch(params, context)


def broken(params, context):
    return {"count": len(fetch(params, context)["entries"])}


def ping(params, context):
    return fetch(params, context)
"""


class _Feed(http.server.BaseHTTPRequestHandler):
    """GET /entries answers `{"entries": server.entries}` with `server.status`; every request's
    query is kept in `server.queries`."""

    def do_GET(self) -> None:
        server = self.server
        split = urllib.parse.urlsplit(self.path)
        server.queries.append(urllib.parse.parse_qs(split.query))  # type: ignore[attr-defined]
        status = server.status if split.path == "/entries" else 404  # type: ignore[attr-defined]
        send_json(self, {"entries": server.entries}, status)  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def feed() -> Iterator[http.server.ThreadingHTTPServer]:
    """The feed server: set `.entries` (and `.status`) between polls; `.queries` lists what
    each request asked for."""
    with serving(_Feed) as server:
        server.entries = []  # type: ignore[attr-defined]
        server.status = 200  # type: ignore[attr-defined]
        server.queries = []  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A catalog folder holding the `feed` app."""
    folder = tmp_path / "catalog" / APP
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    return folder.parent


@pytest.fixture(autouse=True)
def generic_off(clean_env: pytest.MonkeyPatch) -> Iterator[None]:
    """No corral variable from the shell, and the flag off unless a test turns it on."""
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=False):
        yield


def _sandbox(backend: str = "process") -> NodeSandbox:
    return NodeSandbox(
        executor=backend,
        limits=Limits(max_memory_mb=64),
        settings=load_settings(CORRAL_EGRESS_ALLOW="127.0.0.1"),
    )


@pytest.fixture
def sandbox() -> Iterator[NodeSandbox]:
    """A process-backend sandbox whose egress policy allows 127.0.0.1."""
    with _sandbox() as box:
        yield box


def _open_store(spec: dict[str, str], clock: Callable[[], float] = time.time) -> Store:
    """A brand-new store object on `spec`'s state: the SQLite state dir, or the Redis."""
    if "redis" in spec:
        return RedisStore(spec["redis"], prefix=spec["prefix"], clock=clock)
    return open_store(load_settings(CORRAL_STATE_DIR=spec["state_dir"]), clock=clock)


class Polls:
    """A TriggerPoller of its own (catalog, sandbox, store), driven from sync test code on
    one event loop (redis.asyncio binds its connections to one)."""

    def __init__(self, runner: asyncio.Runner, poller: TriggerPoller, base_url: str) -> None:
        self.runner = runner
        self.poller = poller
        self.connection = {"baseUrl": base_url}

    def poll(self, trigger: str, params: dict[str, Any] | None = None, **kw: Any) -> TriggerPoll:
        """One poll of `trigger`; records nothing."""
        return self.runner.run(self.poller.poll(APP, trigger, params, self.connection, **kw))

    def commit(self, poll: TriggerPoll) -> None:
        self.runner.run(self.poller.commit(poll))

    def step(self, trigger: str, params: dict[str, Any] | None = None, **kw: Any) -> TriggerPoll:
        """A poll whose items are handed on: polled, then committed."""
        poll = self.poll(trigger, params, **kw)
        self.commit(poll)
        return poll


@contextlib.contextmanager
def polling(
    catalog: Path,
    sandbox: NodeSandbox,
    spec: dict[str, str],
    feed: http.server.HTTPServer,
    **store: Any,
) -> Iterator[Polls]:
    """Polls over a new framework, IntegrationManager, store and TriggerPoller (`store`:
    the store's clock, the poller's seen_ttl_s); the store closed on the way out."""
    ttl = {"seen_ttl_s": store.pop("seen_ttl_s")} if "seen_ttl_s" in store else {}
    with asyncio.Runner() as runner:
        opened = _open_store(spec, **store)
        try:
            manager = IntegrationManager(ConnectorFramework([catalog]), sandbox)
            base_url = f"http://127.0.0.1:{feed.server_address[1]}"
            yield Polls(runner, TriggerPoller(manager, opened, **ttl), base_url)
        finally:
            runner.run(opened.close())


@pytest.fixture
def polls(catalog, sandbox, feed, tmp_path) -> Iterator[Polls]:
    """Polls on the process sandbox and a SQLite store in tmp_path."""
    with polling(catalog, sandbox, {"state_dir": str(tmp_path / "state")}, feed) as p:
        yield p


def entry(id: Any, updated_at: Any, **more: Any) -> dict[str, Any]:
    return {"id": id, "updated_at": updated_at, **more}


def keys(poll: TriggerPoll) -> list[str]:
    return [item.key for item in poll.new]


def since(feed: Any) -> list[str | None]:
    """The `since` each request sent, in order (None: not sent)."""
    return [query.get("since", [None])[0] for query in feed.queries]


# -- baseline, then only what is new ------------------------------------------------------


def test_the_first_poll_is_a_baseline_recorded_once_committed(polls, feed):
    """The first poll delivers nothing but, once committed, what it saw is never new; an
    uncommitted baseline leaves the next poll a baseline again."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z"), entry(2, "2024-05-01T11:00:00Z")]
    first = polls.poll("new_entries")
    assert first.baseline is True and first.new == []
    assert [item.key for item in first.returned] == ["1", "2"]
    assert (first.cursor_before, first.cursor) == (None, "2024-05-01T11:00:00Z")

    again = polls.step("new_entries")  # the first one was not committed: still a baseline
    assert again.baseline is True and again.new == []

    after = polls.poll("new_entries")
    assert after.baseline is False and after.new == []
    assert after.cursor_before == "2024-05-01T11:00:00Z"
    assert after.executor == "bespoke" and after.fallback_reason is None


def test_an_empty_first_poll_ends_the_baseline(polls, feed):
    """A trigger set up over an empty list delivers the first items that appear."""
    assert polls.step("new_entries").baseline is True
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    poll = polls.step("new_entries")
    assert poll.baseline is False and keys(poll) == ["1"]


def test_deliver_existing_delivers_the_first_polls_items(polls, feed):
    """deliver_existing=True: the first poll delivers what the API lists, then records it."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z"), entry(2, "2024-05-01T11:00:00Z")]
    first = polls.step("new_entries", deliver_existing=True)
    assert first.baseline is False
    assert keys(first) == ["1", "2"]
    assert [item.value for item in first.new] == feed.entries
    assert polls.poll("new_entries").new == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_later_poll_delivers_only_new_items_in_order(catalog, feed, tmp_path, backend):
    """After the baseline only unseen items are delivered, in the order the API listed
    them, with their key, cursor and value; on either sandbox backend."""
    spec = {"state_dir": str(tmp_path / "state")}
    with _sandbox(backend) as box, polling(catalog, box, spec, feed) as polls:
        feed.entries = [entry(1, "2024-05-01T10:00:00Z"), entry(2, "2024-05-01T10:00:00Z")]
        polls.step("new_entries")
        feed.entries = [
            entry(4, "2024-05-01T12:00:00Z", title="four"),
            entry(1, "2024-05-01T10:00:00Z"),
            entry(3, "2024-05-01T11:00:00Z", title="three"),
        ]
        poll = polls.step("new_entries")
        assert keys(poll) == ["4", "3"]
        assert poll.new[0].cursor == "2024-05-01T12:00:00Z"
        assert poll.new[1].value == entry(3, "2024-05-01T11:00:00Z", title="three")
        assert poll.to_dict()["new"] == [
            {"key": "4", "item": feed.entries[0]}, {"key": "3", "item": feed.entries[2]},
        ]  # fmt: skip
        assert poll.to_dict()["returned"] == 3 and poll.cursor == "2024-05-01T12:00:00Z"
        assert polls.poll("new_entries").new == []


def test_cursor_strategy_needs_an_unseen_key_and_a_cursor_not_older(polls, feed):
    """Strategy cursor: an item is new when its key is unseen AND its cursor is not older
    than the stored one (equal is not older; no cursor is not older). A seen item updated
    since is not delivered again, but its newer cursor does advance the stored one."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    polls.step("new_entries")
    feed.entries = [
        entry(1, "2024-05-01T11:00:00Z"),  # seen key, newer cursor: not delivered
        entry(2, "2024-05-01T09:00:00Z"),  # unseen, older than the stored cursor: not
        entry(3, "2024-05-01T10:00:00Z"),  # unseen, equal to it: delivered
        entry(4, "2024-05-01T10:30:00Z"),  # unseen, newer: delivered
        {"id": 5, "title": "no cursor"},  # unseen, no cursor: delivered
    ]
    poll = polls.step("new_entries")
    assert poll.cursor_before == "2024-05-01T10:00:00Z"
    assert keys(poll) == ["3", "4", "5"]
    assert poll.cursor == "2024-05-01T11:00:00Z"
    assert [item.cursor for item in poll.returned][-1] is None
    # the older item was recorded by the commit too: listed again later, it is not new
    feed.entries = [entry(2, "2024-05-01T12:00:00Z")]
    assert polls.poll("new_entries").new == []


def test_key_strategy_delivers_any_unseen_key_whatever_its_cursor(polls, feed):
    """Strategy key: an unseen key is new even with an older cursor; a seen key is not new
    even with a newer one."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    polls.step("by_key")
    feed.entries = [entry(2, "2024-05-01T08:00:00Z"), entry(1, "2024-05-02T00:00:00Z")]
    poll = polls.step("by_key")
    assert poll.cursor_before == "2024-05-01T10:00:00Z"
    assert keys(poll) == ["2"]
    assert poll.cursor == "2024-05-02T00:00:00Z"


# -- the cursor param, at-least-once, restarts ---------------------------------------------


def test_the_stored_cursor_is_sent_in_dedupe_param(polls, feed):
    """`dedupe.param` gets the committed cursor on the next poll (not before: the first poll
    sends none; an uncommitted poll does not advance it); a value the caller set wins."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    polls.step("new_entries")
    feed.entries.append(entry(2, "2024-05-01T11:00:00Z"))
    assert keys(polls.poll("new_entries")) == ["2"]  # not committed
    assert keys(polls.step("new_entries")) == ["2"]
    polls.poll("new_entries")
    assert since(feed) == [
        None, "2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z",
    ]  # fmt: skip

    # a named `state` is the same whatever the params: there, a `since` the caller set wins
    polls.step("new_entries", state="wf-1")
    poll = polls.poll("new_entries", {"since": "2000-01-01T00:00:00Z"}, state="wf-1")
    assert poll.baseline is False and poll.cursor_before == "2024-05-01T11:00:00Z"
    assert since(feed)[-2:] == [None, "2000-01-01T00:00:00Z"]


def test_a_poll_not_committed_records_nothing(polls, feed):
    """Delivery is at least once: until `commit`, the same new items come again with the
    same keys, and the stored cursor stays where it was."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    polls.step("new_entries")
    feed.entries.append(entry(2, "2024-05-01T11:00:00Z"))
    first = polls.poll("new_entries")
    second = polls.poll("new_entries")
    assert keys(first) == keys(second) == ["2"]
    assert second.cursor_before == "2024-05-01T10:00:00Z"
    polls.commit(second)
    assert polls.poll("new_entries").new == []


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_dedupe_survives_a_restart(catalog, feed, tmp_path, kind, request):
    """Poll and commit, then a brand-new store, TriggerPoller and sandbox on the same state
    (SQLite state dir, or the same Redis): the seen keys and the cursor are still known."""
    if kind == "redis":
        spec = {"redis": request.getfixturevalue("redis_url"), "prefix": f"test:{tmp_path.name}:"}
    else:
        spec = {"state_dir": str(tmp_path / "state")}
    feed.entries = [entry(1, "2024-05-01T10:00:00Z"), entry(2, "2024-05-01T11:00:00Z")]
    with _sandbox() as box, polling(catalog, box, spec, feed) as polls:
        assert polls.step("new_entries").baseline is True

    feed.entries = [*feed.entries, entry(3, "2024-05-01T12:00:00Z")]
    with _sandbox() as box, polling(catalog, box, spec, feed) as polls:
        poll = polls.step("new_entries")
        assert poll.baseline is False
        assert poll.cursor_before == "2024-05-01T11:00:00Z"
        assert keys(poll) == ["3"]
    assert since(feed) == [None, "2024-05-01T11:00:00Z"]

    with _sandbox() as box, polling(catalog, box, spec, feed) as polls:
        assert polls.poll("new_entries").new == []  # the second life's commit was kept too
    assert since(feed)[-1] == "2024-05-01T12:00:00Z"


def test_seen_keys_live_seen_ttl_s_after_they_were_last_listed(catalog, sandbox, feed, tmp_path):
    """A seen key is forgotten seen_ttl_s after the last committed poll that listed it: with
    strategy key the item is then new again; with strategy cursor its old cursor still
    keeps it out."""
    now = [1_700_000_000.0]
    spec = {"state_dir": str(tmp_path / "state")}
    with polling(catalog, sandbox, spec, feed, clock=lambda: now[0], seen_ttl_s=60) as polls:
        feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
        polls.step("by_key")
        now[0] += 50
        assert polls.step("by_key").new == []  # listed again: remembered 60 s from now
        now[0] += 50
        assert polls.poll("by_key").new == []
        now[0] += 100
        assert keys(polls.poll("by_key")) == ["1"]

        feed.entries = [entry(1, "2024-05-01T10:00:00Z"), entry(2, "2024-05-01T11:00:00Z")]
        polls.step("new_entries")
        now[0] += 100
        assert "1" not in keys(polls.poll("new_entries"))


# -- keys, duplicates, cursors --------------------------------------------------------------


def test_items_without_a_key_are_deduped_by_content(polls, feed):
    """With no dedupe, or an item lacking its key, an item is its content (key order does
    not matter): the same content is not new again, other content is."""
    feed.entries = [{"a": 1, "b": 2}, {"msg": "x"}]
    polls.step("anything")
    feed.entries = [{"b": 2, "a": 1}, {"msg": "x"}, {"msg": "y"}]
    poll = polls.step("anything")
    assert [item.value for item in poll.new] == [{"msg": "y"}]
    assert poll.new[0].key.startswith("sha256:")

    feed.entries = [{"title": "no id", "updated_at": "2024-05-01T10:00:00Z"}]
    polls.step("new_entries")
    feed.entries.append({"title": "another", "updated_at": "2024-05-01T10:00:00Z"})
    poll = polls.step("new_entries")
    assert [item.value["title"] for item in poll.new] == ["another"]


def test_duplicates_within_one_answer_are_delivered_once(polls, feed):
    """An item listed twice in one answer (even as two versions) is delivered once: the
    first time it comes."""
    feed.entries = [
        entry(1, "2024-05-01T10:00:00Z"), entry(2, "2024-05-01T10:00:00Z", v=1),
        entry(1, "2024-05-01T10:00:00Z"), entry(2, "2024-05-01T10:05:00Z", v=2),
    ]  # fmt: skip
    poll = polls.step("new_entries", deliver_existing=True)
    assert keys(poll) == ["1", "2"]
    assert poll.new[1].value["v"] == 1
    feed.entries = [{"msg": "same"}, {"msg": "same"}]
    assert len(polls.step("anything", deliver_existing=True).new) == 1


def test_iso_cursors_compare_as_instants(polls, feed):
    """ISO 8601 cursors in other time zones (or with fractions, or naive: UTC) compare as
    the instants they name, not as strings; the newest is stored as the API wrote it."""
    feed.entries = [entry(1, "2024-05-01T12:00:00+02:00")]  # 10:00 UTC
    polls.step("new_entries")
    feed.entries = [
        entry(2, "2024-05-01T10:30:00Z"),  # later, though smaller as a string
        entry(3, "2024-05-01T11:00:00+02:00"),  # 09:00 UTC: earlier, though larger
        entry(4, "2024-05-01T10:00:00.5Z"),  # half a second later
        entry(5, "2024-05-01T09:59:59"),  # naive: UTC, a second earlier
    ]
    poll = polls.step("new_entries")
    assert keys(poll) == ["2", "4"]
    assert poll.cursor == "2024-05-01T10:30:00Z"
    assert since(feed)[-1] == "2024-05-01T12:00:00+02:00"


def test_numeric_cursors_compare_as_numbers(polls, feed):
    """Numeric cursors compare by value (10 after 9, 9.5 between), and reach an integer
    `dedupe.param` as the number; `items` picks the list out of a bespoke handler's value."""
    feed.entries = [{"id": "a", "seq": 9}]
    polls.step("numbered")
    feed.entries = [{"id": "b", "seq": 10}, {"id": "c", "seq": 8}, {"id": "d", "seq": 9.5}]
    poll = polls.step("numbered")
    assert keys(poll) == ["b", "d"]
    assert (poll.cursor_before, poll.cursor) == (9, 10)
    polls.poll("numbered")
    assert [query.get("after") for query in feed.queries] == [None, ["9"], ["10"]]


def test_numbers_sent_as_strings_compare_as_numbers(polls, feed):
    """A cursor the API sends as a numeric string ("99", then "100") compares by value: the
    cursor moves on and no later item is lost."""
    feed.entries = [entry(1, "98"), entry(2, "99")]
    polls.step("new_entries")
    feed.entries = [entry(3, "100"), entry(4, "101"), entry(5, "9.5")]
    poll = polls.step("new_entries")
    assert keys(poll) == ["3", "4"] and poll.cursor == "101"


def test_two_accounts_of_one_api_keep_their_own_state(polls, feed):
    """Two connections to the same baseUrl with other credentials are two triggers: what
    one has seen does not hide the other's items."""
    feed.entries = [entry(1, 50)]
    polls.connection = {**polls.connection, "credentials": {"token": "account-a-token"}}
    polls.step("new_entries")
    polls.connection = {**polls.connection, "credentials": {"token": "account-b-token"}}
    feed.entries = [entry(6, 6)]
    assert polls.step("new_entries").baseline  # its own first poll
    feed.entries = [entry(6, 6), entry(7, 7)]
    assert keys(polls.step("new_entries")) == ["7"]


def test_a_cursor_the_param_does_not_accept_is_not_sent(polls, feed):
    """A stored cursor that breaks the param's contract (a number for a string param) is
    left out: the API is asked for everything and dedupe still works."""
    feed.entries = [entry(1, 5)]
    polls.step("new_entries")
    feed.entries = [entry(1, 5), entry(2, 6)]
    poll = polls.step("new_entries")
    assert keys(poll) == ["2"] and poll.cursor_before == 5
    assert since(feed) == [None, None]


# -- errors ---------------------------------------------------------------------------------


def test_a_trigger_returning_no_list_is_a_code_error(polls, feed):
    """A trigger whose value holds no list of items fails as CodeError naming the trigger and
    `items`; nothing is recorded."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    with pytest.raises(corral.CodeError) as caught:
        polls.poll("broken")
    assert "feed.broken" in caught.value.message
    assert "items" in caught.value.message and "dict" in caught.value.message


def test_polling_an_action_is_invalid_input(polls, feed):
    """poll() on an action (or a name the app lacks) is InvalidInput; nothing is sent."""
    with pytest.raises(corral.InvalidInput, match=r"feed\.ping is an action, not a trigger"):
        polls.poll("ping")
    with pytest.raises(corral.InvalidInput, match="no action or trigger 'nope'"):
        polls.poll("nope")
    assert feed.queries == []


def test_an_http_error_surfaces_and_records_nothing(polls, feed):
    """The API answering 500 ends the poll as HttpError (status 500); nothing is recorded,
    so once the API recovers the next poll is still the baseline."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    feed.status = 500
    with pytest.raises(corral.HttpError) as caught:
        polls.poll("new_entries")
    assert caught.value.type == "http_error" and caught.value.status == 500
    feed.status = 200
    assert polls.poll("new_entries").baseline is True


# -- the generic path -----------------------------------------------------------------------


def test_a_generic_only_trigger_runs_only_with_the_flag(polls, feed):
    """A trigger with no handler is not_supported with the flag off (nothing sent); with it
    on, it runs through the generic path: `items` picks the list out of the response body,
    the cursor goes out as a query param, and an HTTP 500 is an HttpError."""
    feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
    with pytest.raises(corral.NotSupported, match="GENERIC_EXECUTOR_ENABLED"):
        polls.poll("listed")
    assert feed.queries == []

    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        first = polls.step("listed")
        assert first.baseline is True and first.executor == "generic"
        assert first.fallback_reason == "no bespoke handler"
        assert [item.key for item in first.returned] == ["1"]
        feed.entries.append(entry(2, "2024-05-01T11:00:00Z"))
        poll = polls.step("listed")
        assert keys(poll) == ["2"] and poll.executor == "generic"
        assert since(feed) == [None, "2024-05-01T10:00:00Z"]
        feed.status = 500
        with pytest.raises(corral.HttpError) as caught:
            polls.poll("listed")
        assert caught.value.status == 500


def test_a_wildcard_items_path_names_each_item(polls, feed):
    """`items: $.entries[*]` over an empty list is zero items, not an error; an item that is
    itself a list stays one item."""
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        feed.entries = [entry(1, "2024-05-01T10:00:00Z")]
        assert [item.key for item in polls.step("listed_each").returned] == ["1"]
        feed.entries = []
        assert polls.poll("listed_each").returned == []
        feed.entries = [[1, 2]]
        assert [item.value for item in polls.poll("listed_each").returned] == [[1, 2]]
