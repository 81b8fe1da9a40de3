"""Extract, transform, load as a chain of generators: pages from a cursor API, a filter and
a reshaping step, batches of 3 posted to a bulk endpoint."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from itertools import islice


def extract(base_url, headers):
    cursor = ""
    while True:
        body = (
            http.get(
                base_url + "/cursor/products",
                params={"cursor": cursor, "limit": 4},
                headers=headers,
            )
            .raise_for_status()
            .json()
        )
        yield from body["data"]
        cursor = body.get("next_cursor")
        if not cursor:
            return


def transform(products):
    for product in products:
        if not product["active"]:
            continue
        yield {"sku": product["sku"].upper(), "price_cents": round(product["price"] * 100)}


def batched(iterable, size):
    iterator = iter(iterable)
    while True:
        batch = list(islice(iterator, size))
        if not batch:
            return
        yield batch


def run(params, context):
    connection = context["connection"]
    headers = {"Authorization": "Bearer " + connection["credentials"]["token"]}
    loaded = []
    for batch in batched(transform(extract(connection["baseUrl"], headers)), 3):
        echoed = (
            http.post(connection["baseUrl"] + "/echo/bulk", json={"items": batch}, headers=headers)
            .raise_for_status()
            .json()
        )
        loaded.append(len(echoed["json"]["items"]))
    return {
        "batches": loaded,
        "skus": [p["sku"] for p in transform(extract(connection["baseUrl"], headers))],
    }
