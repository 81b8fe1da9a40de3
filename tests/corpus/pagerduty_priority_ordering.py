"""PagerDuty incidents ordered by a Priority value class (functools.total_ordering over
__eq__ and __lt__), with a __repr__ for logs and a classmethod parser."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from functools import total_ordering


@total_ordering
class Priority:
    LEVELS = ("P1", "P2", "P3", "P4", "P5")

    def __init__(self, name):
        if name not in self.LEVELS:
            raise ValueError(f"unknown priority {name!r}")
        self.name = name

    @classmethod
    def parse(cls, incident):
        summary = (incident.get("priority") or {}).get("summary") or "P5"
        return cls(summary)

    @property
    def rank(self):
        return self.LEVELS.index(self.name)

    def __eq__(self, other):
        return isinstance(other, Priority) and self.rank == other.rank

    def __lt__(self, other):
        return self.rank < other.rank

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return f"Priority({self.name!r})"


def run(params, context):
    connection = context["connection"]
    body = (
        http.get(
            connection["baseUrl"] + "/incidents",
            params={"statuses[]": "triggered"},
            headers={"Authorization": "Token token=" + connection["credentials"]["api_key"]},
        )
        .raise_for_status()
        .json()
    )
    ranked = sorted(body["incidents"], key=lambda i: (Priority.parse(i), i["created_at"]))
    urgent = [i["id"] for i in ranked if Priority.parse(i) <= Priority("P2")]
    log("most urgent:", repr(Priority.parse(ranked[0])))
    return {
        "order": [i["id"] for i in ranked],
        "urgent": urgent,
        "distinct": len({Priority.parse(i) for i in ranked}),
    }
