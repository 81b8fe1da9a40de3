"""Stored connections: `{baseUrl, credentials}` per app, the credentials encrypted with the
key ring and never shown again (a listing names them, without values)."""

from __future__ import annotations

from typing import Any

from corral.executors import normalise_app_id
from corral.service._keys import KeyRing
from corral.service.records import Records


async def store_connection(
    records: Records,
    ring: KeyRing,
    app: str,
    base_url: str | None,
    credentials: dict[str, Any],
    now: float,
) -> dict[str, Any]:
    """Store (or replace) the connection of `app`; its public view."""
    connection = {
        "app": normalise_app_id(app),
        "baseUrl": base_url,
        "secret": ring.encrypt(credentials),
        "credential_names": sorted(credentials),
        "key_id": ring.primary_id,
        "updated_at": now,
    }
    await records.put_connection(connection)
    return public_view(connection)


def public_view(connection: dict[str, Any]) -> dict[str, Any]:
    """A connection without its secret: app, baseUrl, credential names, key id, updated."""
    return {key: value for key, value in connection.items() if key != "secret"}


async def connections_for(
    records: Records, ring: KeyRing, definition: dict[str, Any]
) -> dict[str, Any]:
    """The decrypted connections of the apps a workflow's nodes use (those stored)."""
    apps = {
        normalise_app_id(node["app"])
        for node in definition.get("nodes") or []
        if isinstance(node, dict) and isinstance(node.get("app"), str)
    }
    found: dict[str, Any] = {}
    for app in sorted(apps):
        connection = await records.get_connection(app)
        if connection is not None:
            found[app] = {
                "baseUrl": connection["baseUrl"],
                "credentials": ring.decrypt(connection["secret"]),
            }
    return found
