"""HubSpot contacts as an n8n node does it: `returnAll` or `limit`, the `after` cursor in
`paging.next`, and a `simplify` option that flattens the properties."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

MAX_PAGES = 5000  # a guard against an API that never stops paging


def hubspotApiRequest(context, method, endpoint, query=None):
    connection = context["connection"]
    response = http.request(
        method,
        connection["baseUrl"] + endpoint,
        params=query or {},
        headers={"Authorization": "Bearer " + connection["credentials"]["access_token"]},
    )
    response.raise_for_status()
    return response.json()


def hubspotApiRequestAllItems(context, endpoint, query, limit=None):
    returnData = []
    query = dict(query)
    for _ in range(MAX_PAGES):
        body = hubspotApiRequest(context, "GET", endpoint, query)
        returnData.extend(body["results"])
        after = body.get("paging", {}).get("next", {}).get("after")
        if not after or (limit is not None and len(returnData) >= limit):
            break
        query["after"] = after
    return returnData if limit is None else returnData[:limit]


def simplify(contact):
    props = contact["properties"]
    return {
        "id": contact["id"],
        "email": props.get("email"),
        "name": " ".join(p for p in (props.get("firstname"), props.get("lastname")) if p),
        "stage": props.get("lifecyclestage"),
    }


def run(params, context):
    query = {"limit": 3, "properties": ",".join(params["properties"])}
    limit = None if params.get("returnAll") else params.get("limit", 50)
    contacts = hubspotApiRequestAllItems(context, "/crm/v3/objects/contacts", query, limit)
    items = [simplify(c) for c in contacts] if params.get("simplify") else contacts
    stages = {item["stage"] for item in items}
    by_stage = {stage: sum(1 for i in items if i["stage"] == stage) for stage in sorted(stages)}
    return {"json": items, "stages": by_stage}
