"""Idempotent writes: the key is a UUIDv5 of the canonical JSON of the payload, the body is
signed with SHA-256, and both travel as headers."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import hashlib
import json
import uuid

NAMESPACE = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")


def canonical(payload):
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def run(params, context):
    connection = context["connection"]
    results = []
    for payment in params["payments"]:
        body = canonical(payment)
        key = str(uuid.uuid5(NAMESPACE, body))
        echoed = (
            http.post(
                connection["baseUrl"] + "/echo/payments",
                data=body,
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": key,
                    "Digest": "SHA-256=" + hashlib.sha256(body.encode()).hexdigest(),
                },
            )
            .raise_for_status()
            .json()
        )
        results.append(
            {
                "key": key,
                "echoed_key": echoed["headers"]["idempotency-key"],
                "amount": echoed["json"]["amount"],
            }
        )
    return {"results": results, "distinct_keys": len({r["key"] for r in results})}
