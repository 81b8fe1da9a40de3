"""Shopify orders with cursor-based `page_info` pagination in the Link header (rel="previous"
and rel="next" both), summed per financial status with Decimal."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from collections import defaultdict
from decimal import Decimal


def next_link(header):
    for part in (header or "").split(","):
        url, _, rel = part.partition(";")
        if rel.strip() == 'rel="next"':
            return url.strip().strip("<>")
    return None


class Paginator:
    def __init__(self, first_url, headers):
        self.url = first_url
        self.headers = headers
        self.pages = 0

    def __iter__(self):
        url = self.url
        while url:
            response = http.get(url, headers=self.headers)
            response.raise_for_status()
            self.pages += 1
            yield from response.json()["orders"]
            url = next_link(response.headers.get("link"))


def run(params, context):
    connection = context["connection"]
    pages = Paginator(
        connection["baseUrl"] + "/admin/api/2024-01/orders.json?limit=2&status=any",
        {"X-Shopify-Access-Token": connection["credentials"]["access_token"]},
    )
    totals = defaultdict(Decimal)
    count = 0
    for order in pages:
        totals[order["financial_status"]] += Decimal(order["total_price"])
        count += 1
    return {
        "orders": count,
        "pages": pages.pages,
        "totals": {status: str(total) for status, total in sorted(totals.items())},
    }
