"""`corral rotate-keys`: re-encrypt every stored credential with the first key of
CORRAL_ENCRYPTION_KEYS."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from corral.cli._common import plural
from corral.config import get_settings


def add_commands(commands: Any) -> None:
    """Add `rotate-keys` to the `corral` command."""
    rotate = commands.add_parser(
        "rotate-keys",
        help="re-encrypt stored credentials with the first key of CORRAL_ENCRYPTION_KEYS",
        description="Re-encrypt every stored connection's credentials with the first key of "
        "CORRAL_ENCRYPTION_KEYS (keep the old keys after it until this has run). One "
        "connection at a time, each written only over what was read: safe to interrupt and "
        "to repeat; a second run changes nothing. Progress goes to stderr.",
    )
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    rotate.set_defaults(handler=_rotate_keys)


def _rotate_keys(args: argparse.Namespace) -> int:
    from corral.service._keys import load_key_ring, rotate_keys
    from corral.service.records import open_records

    settings = get_settings()
    ring = load_key_ring(settings)

    def progress(done: int, total: int, app: str) -> None:
        print(f"corral rotate-keys: {done}/{total} {app}", file=sys.stderr, flush=True)

    async def rotate() -> Any:
        records = open_records(settings)
        try:
            return await rotate_keys(records, ring, progress=progress)
        finally:
            await records.close()

    outcome = asyncio.run(rotate())
    if args.json:
        print(json.dumps({"key_id": ring.primary_id, **vars(outcome)}))
    else:
        print(
            f"{plural(outcome.rotated, 'connection')} re-encrypted with key {ring.primary_id}, "
            f"{outcome.current} already on it"
            + (f", {outcome.raced} changed meanwhile (left as written)" if outcome.raced else "")
        )
    return 0
