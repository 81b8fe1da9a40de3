"""Canonical JSON digests: fingerprints, derived idempotency keys and state keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_digest(value: Any) -> str:
    """A SHA-256 of `value` as canonical JSON (sorted keys, no spaces), in hex."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
