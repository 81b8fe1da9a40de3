"""Verify a Stripe webhook (the `Stripe-Signature: t=...,v1=...` scheme) before acting on
it: HMAC-SHA256 over "<t>.<payload>", a constant-time compare, a 5-minute tolerance."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import hashlib
import hmac
import json
from datetime import UTC, datetime

TOLERANCE_S = 300


class SignatureVerificationError(Exception):
    def __init__(self, message, header):
        super().__init__(message)
        self.header = header


def parse_header(header):
    pairs = [item.split("=", 1) for item in header.split(",")]
    return {key.strip(): value for key, value in pairs}


def verify(payload, header, secret, now):
    fields = parse_header(header)
    timestamp = int(fields["t"])
    signed = f"{timestamp}.{payload}".encode()
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields.get("v1", "")):
        raise SignatureVerificationError("No signatures found matching the payload", header)
    age = now - datetime.fromtimestamp(timestamp, tz=UTC)
    if abs(age.total_seconds()) > TOLERANCE_S:
        raise SignatureVerificationError("Timestamp outside the tolerance zone", header)
    return age


def run(params, context):
    connection = context["connection"]
    delivery = http.get(connection["baseUrl"] + "/webhooks/stripe")
    now = datetime.fromisoformat(params["now"])
    secret = connection["credentials"]["signing_secret"]
    try:
        age = verify(delivery.text, delivery.headers["stripe-signature"], secret, now)
    except SignatureVerificationError as exc:
        return {"verified": False, "reason": str(exc)}
    event = json.loads(delivery.text)
    invoice = event["data"]["object"]
    forged = delivery.headers["stripe-signature"].replace("v1=", "v1=0")
    try:
        verify(delivery.text, forged, secret, now)
        forged_rejected = False
    except SignatureVerificationError:
        forged_rejected = True
    return {
        "verified": True,
        "forged_rejected": forged_rejected,
        "type": event["type"],
        "age_seconds": int(age.total_seconds()),
        "amount_due": invoice["amount_due"] / 100,
    }
