"""Noticing what other processes write to the shared state, so that whoever waits for it
(a worker for a queued run, the API for a finished run or a run's next event) wakes at once
instead of on its next poll.

A writer rings a topic (`queue`, `runs`, `events`, `cancels`) after its commit; a waiter
subscribes an asyncio.Event to the topic and follows "clear, look, wait": it clears the
event, looks at the state, then waits for the event with a time-out. A ring after the clear
(also one made while it looked) sets the event, so nothing is missed; the time-out is the
safety net. A ring may name what changed (the run that finished): a waiter that subscribes
a set of names too learns which, where the backend carries names (Redis); elsewhere it is
told `ANY`, and looks at everything it waits for.

`Changes` notices nothing (`live` is False): its waiters poll. `FileChanges` (the embedded
state) rings a topic by touching a file of that name in a directory (the state dir's
`changes/`), which every process watching it with inotify hears within microseconds.
`RedisChanges` (the state on Redis) publishes topics on a channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import redis.asyncio
from inotify_simple import INotify, flags

logger = logging.getLogger("corral.service")

# queue: a run was queued; runs: a run finished (named by its id); events: a run's stream
# grew; cancels: a cancel was asked for.
TOPICS = ("queue", "runs", "events", "cancels")
ANY = ""  # the name of a ring that names nothing: whatever the topic holds may have changed
# A `runs` ring on Redis also carries the finished record (its JSON, after a newline) when
# it is at most this long: whoever waits for the run has it without reading it back.
RING_RECORD_MAX = 64 * 1024


def finished_ring(name: str) -> tuple[str, str]:
    """A `runs` ring's run id and the finished record it carries, as JSON ('' if none)."""
    run_id, _, record = name.partition("\n")
    return run_id, record


# A subscriber: its event, and the set its rings' names go to (None: names are not wanted).
_Subscribers = dict[asyncio.Event, set[str] | None]


class Changes:
    """Topics rung by writers: this base rings and hears nothing (`live` is False)."""

    live = False

    async def ring(self, topic: str, name: str = ANY) -> None:
        """Tell every process that watches `topic` that something in it (`name`) changed."""

    def subscribe(self, topic: str, event: asyncio.Event, names: set[str] | None = None) -> None:
        """Set `event` at every ring of `topic` heard from now on, and add the ring's name
        to `names` (`ANY` when it names nothing, or the backend carries no names)."""

    def unsubscribe(self, topic: str, event: asyncio.Event) -> None:
        """Stop setting `event`."""

    async def close(self) -> None:
        """Stop hearing rings; idempotent."""


class FileChanges(Changes):
    """Topics as files in `directory`: a ring touches the topic's file (one utime), which
    inotify reports to every process that watches that file; a process watches the files
    of the topics it subscribes to, and is not woken by the others. Hearing starts at the
    first subscription, on that subscriber's event loop; where it cannot (no inotify
    instance left, a file system without it), `live` turns False, said once, and the
    subscribers poll."""

    live = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Made once (heard as a ring), never touched by an open. Where they cannot be made
        # (a full disk), rings make them later, and hearing says why it cannot start.
        with contextlib.suppress(OSError):
            directory.mkdir(mode=0o700, exist_ok=True)
            for topic in TOPICS:
                os.close(os.open(directory / topic, os.O_CREAT | os.O_WRONLY, 0o600))
        self._subscribers: dict[str, _Subscribers] = {topic: {} for topic in TOPICS}
        self._inotify: INotify | None = None
        self._directory_watch = -1
        self._watches: dict[int, str] = {}  # watch descriptor -> topic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def ring(self, topic: str, name: str = ANY) -> None:
        try:  # a touch carries no name
            os.utime(self.directory / topic)
        except FileNotFoundError:  # removed: made again, which is heard too
            with contextlib.suppress(OSError):  # the state dir itself is going away
                os.close(os.open(self.directory / topic, os.O_CREAT | os.O_WRONLY, 0o600))

    def subscribe(self, topic: str, event: asyncio.Event, names: set[str] | None = None) -> None:
        self._subscribers[topic][event] = names
        if self._closed or not self.live or topic in self._watches.values():
            return
        try:
            if self._inotify is None:
                self._listen()
            self._watch(topic)
        except OSError as exc:
            self.live = False  # the waiters poll
            logger.warning(
                "corral: cannot watch %s for changes (%s); polling instead (raise "
                "fs.inotify.max_user_instances or max_user_watches if it is the limit)",
                self.directory, os.strerror(exc.errno) if exc.errno else exc,
            )  # fmt: skip

    def unsubscribe(self, topic: str, event: asyncio.Event) -> None:
        self._subscribers[topic].pop(event, None)

    def _listen(self) -> None:
        inotify = INotify(nonblocking=True)
        try:
            # The directory: a topic file made again (heard as a ring, and watched anew).
            self._directory_watch = inotify.add_watch(self.directory, flags.CREATE)
        except OSError:
            inotify.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(inotify.fileno(), self._heard)
        self._inotify = inotify

    def _watch(self, topic: str) -> None:
        """Hear the rings of `topic` (only those: a process is not woken by the topics it
        does not wait on); a file not there yet is watched once a ring makes it."""
        assert self._inotify is not None
        with contextlib.suppress(FileNotFoundError):
            self._watches[self._inotify.add_watch(self.directory / topic, flags.ATTRIB)] = topic

    def _heard(self) -> None:
        assert self._inotify is not None
        try:
            heard = self._inotify.read(timeout=0)
        except BlockingIOError:
            return
        topics = set()
        for event in heard:
            if event.mask & flags.IGNORED:  # its file was removed
                self._watches.pop(event.wd, None)
            elif event.wd == self._directory_watch:
                if self._subscribers.get(event.name):
                    try:
                        self._watch(event.name)
                    except OSError:  # not heard from now on: its waiters poll
                        self.live = False
                    topics.add(event.name)
            elif topic := self._watches.get(event.wd):
                topics.add(topic)
        for topic in topics:
            _wake(self._subscribers[topic], ANY)

    async def close(self) -> None:
        self._closed = True
        inotify, self._inotify = self._inotify, None
        if inotify is None:
            return
        assert self._loop is not None
        with contextlib.suppress(RuntimeError, ValueError):  # the loop is closed already
            self._loop.remove_reader(inotify.fileno())
        inotify.close()
        for subscribers in self._subscribers.values():  # nothing more will be heard: look
            _wake(subscribers, ANY)
            subscribers.clear()


class RedisChanges(Changes):
    """Topics as Redis channels, `<prefix><topic>`: the records' writes publish them in the
    same script or pipeline as the write, other rings are one PUBLISH (its message is the
    ring's name), and hearing is one subscription to the topics subscribed here, on the
    first subscriber's event loop (a new topic renews it). Redis drops what is published
    while no subscription listens (before the first, while one is renewed, while the
    connection is down), so each topic's subscribers are woken with ANY once its
    subscription is confirmed, and once when the connection fails (then they poll: `live`
    stays True, their time-out is the poll)."""

    live = True

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self._client = client
        self.prefix = prefix
        self._subscribers: dict[str, _Subscribers] = {topic: {} for topic in TOPICS}
        self._heard: frozenset[str] = frozenset()  # the topics the task listens to
        self._task: asyncio.Task[None] | None = None

    def channel(self, topic: str) -> str:
        """The Redis channel of `topic`."""
        return self.prefix + topic

    async def ring(self, topic: str, name: str = ANY) -> None:
        await self._client.publish(self.channel(topic), name)

    def subscribe(self, topic: str, event: asyncio.Event, names: set[str] | None = None) -> None:
        self._subscribers[topic][event] = names
        if topic not in self._heard:  # listen to it too, from now on
            if self._task is not None:
                self._task.cancel()
            self._heard |= {topic}
            self._task = asyncio.get_running_loop().create_task(self._hear(self._heard))

    def unsubscribe(self, topic: str, event: asyncio.Event) -> None:
        self._subscribers[topic].pop(event, None)

    def _wake(self, topics: Iterable[str], name: str = ANY) -> None:
        for topic in topics:
            _wake(self._subscribers.get(topic, {}), name)

    async def _hear(self, topics: frozenset[str]) -> None:
        by_channel = {self.channel(topic): topic for topic in topics}
        failures = 0
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(*by_channel)
                    failures = 0
                    async for message in pubsub.listen():
                        topic = by_channel.get(message["channel"], "")
                        if message["type"] == "message":
                            self._wake([topic], message["data"])
                        elif message["type"] == "subscribe":  # heard from now on: look again
                            self._wake([topic])
            except redis.RedisError:
                self._wake(topics)  # rings may have been missed: look again
                failures += 1
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._wake(TOPICS)


def _wake(subscribers: _Subscribers, name: str) -> None:
    for event, names in subscribers.items():
        if names is not None:
            names.add(name)
        event.set()
