"""Mailchimp audience members: Basic auth with any user name and the API key, offset/count
paging against `total_items`, and the subscriber hash (MD5 of the lower-cased email)."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import base64
import hashlib


def subscriber_hash(email):
    return hashlib.md5(email.lower().encode()).hexdigest()


def auth_header(api_key):
    token = base64.b64encode(("anystring:" + api_key).encode()).decode()
    return {"Authorization": "Basic " + token}


def run(params, context):
    connection = context["connection"]
    headers = auth_header(connection["credentials"]["api_key"])
    url = connection["baseUrl"] + "/3.0/lists/" + params["list_id"] + "/members"
    offset, count, members = 0, 2, []
    while True:
        body = http.get(url, params={"offset": offset, "count": count}, headers=headers).json()
        members.extend(
            {"email": m["email_address"], "status": m["status"], "hash": m["id"]}
            for m in body["members"]
        )
        offset += count
        if offset >= body["total_items"]:
            break
    mismatched = [m["email"] for m in members if m["hash"] != subscriber_hash(m["email"])]
    return {
        "subscribed": sorted(m["email"] for m in members if m["status"] == "subscribed"),
        "total": len(members),
        "lookup": subscriber_hash(params["lookup"]),
        "mismatched": mismatched,
    }
