"""Rows as collections.namedtuple records: built from an API listing, updated with
_replace(), serialised with _asdict(), and totalled with a Counter."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from collections import Counter, namedtuple

Invoice = namedtuple("Invoice", ["number", "customer", "amount", "status"])


def run(params, context):
    connection = context["connection"]
    body = (
        http.get(connection["baseUrl"] + "/offset/invoices", params={"offset": 0, "limit": 50})
        .raise_for_status()
        .json()
    )
    invoices = [
        Invoice(i["number"], i["customer"], i["amount"], i["status"]) for i in body["items"]
    ]
    overdue = [
        inv._replace(status="overdue") if inv.status == "open" and inv.amount > 100 else inv
        for inv in invoices
    ]
    statuses = Counter(inv.status for inv in overdue)
    return {
        "invoices": [inv._asdict() for inv in overdue],
        "statuses": dict(statuses),
        "largest": max(invoices, key=lambda inv: inv.amount).number,
    }
