"""A Segment-style batch of track events aggregated per event and per day, with counters
kept both in a dict and on an object."""

from collections import defaultdict
from datetime import datetime
from itertools import groupby


class Stats:
    def __init__(self):
        self.total = 0
        self.anonymous = 0
        self.by_event = {}

    def add(self, event):
        self.total += 1
        if not event.get("userId"):
            self.anonymous += 1
        self.by_event.setdefault(event["event"], 0)
        self.by_event[event["event"]] += 1


def run(params, context):
    events = [e for e in params["batch"] if e.get("type") == "track"]
    stats = Stats()
    revenue = defaultdict(float)
    for event in events:
        stats.add(event)
        revenue[event["event"]] += event.get("properties", {}).get("revenue", 0)

    def day(event):
        return datetime.fromisoformat(event["timestamp"]).date().isoformat()

    per_day = {d: len(list(group)) for d, group in groupby(sorted(events, key=day), key=day)}
    return {
        "total": stats.total,
        "anonymous": stats.anonymous,
        "by_event": stats.by_event,
        "revenue": {k: round(v, 2) for k, v in revenue.items() if v},
        "per_day": per_day,
    }
