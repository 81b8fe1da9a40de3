"""Masking of secrets in everything that leaves the sandbox. Host side.

Each secret is masked as itself and in the encodings it commonly travels in:
percent-encoding (`/` kept or not, `+` for spaces), JSON and Python string
escapes and hex, all in any letter case; and base64 (standard and URL-safe,
at any byte offset inside a longer encoded value, across the line breaks of
`encodebytes`). A secret rebuilt from pieces by the code is not caught here.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

MASK = "[redacted]"
MIN_BASE64_CORE = 6  # shorter base64 fragments would match unrelated text


def _percent_forms(secret: str) -> set[str]:
    return {
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(secret),
        urllib.parse.quote_plus(secret, safe=""),
        urllib.parse.quote_plus(secret),
    }


def _escaped_forms(secret: str) -> set[str]:
    return {
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
    }


def _base64_forms(raw: bytes) -> set[str]:
    """Every run of base64 characters fixed by `raw` alone, at byte offsets 0, 1 and 2."""
    forms = set()
    encoders: list[Callable[[bytes], bytes]] = [base64.b64encode, base64.urlsafe_b64encode]
    for encode in encoders:
        forms.add(encode(raw).decode())
        for offset in range(3):
            encoded = encode(b"\0" * offset + raw).decode()
            first = -(-8 * offset // 6)  # the first character made of secret bits only
            last = 8 * (offset + len(raw)) // 6  # one past the last such character
            core = encoded[first:last]
            if len(core) >= MIN_BASE64_CORE:
                forms.add(core)
    return forms


class Redactor:
    """Replaces every secret, in every form it knows, with a mask."""

    def __init__(self, secrets: Iterable[str]) -> None:
        plain: set[str] = set()
        encoded: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            raw = secret.encode("utf-8", "surrogatepass")
            plain |= {secret, raw.hex()}
            plain |= _percent_forms(secret) | _escaped_forms(secret)
            encoded |= _base64_forms(raw)
        # Longest first, so a form that contains another is masked whole. Plain forms
        # match in any case (a lower-cased secret is still a leak, and so is %2f for
        # %2F); base64 is case-exact but may be broken into lines by encodebytes().
        alternatives = sorted(
            [(form, f"(?i:{re.escape(form)})") for form in plain if form]
            + [(form, "\n?".join(map(re.escape, form))) for form in encoded],
            key=lambda pair: len(pair[0]),
            reverse=True,
        )
        self._pattern = re.compile("|".join(p for _, p in alternatives)) if alternatives else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        """`text` with every secret masked."""
        return text if self._pattern is None else self._pattern.sub(MASK, text)

    def value(self, value: Any) -> Any:
        """A JSON value (as json.loads makes it) with secrets masked in strings, keys and numbers.

        Walks without recursion: the output may be nested as deep as JSON allows.
        """
        if self._pattern is None:
            return value
        root = [value]
        pending: list[tuple[Any, Any]] = [(root, 0)]
        while pending:
            holder, key = pending.pop()
            item = holder[key]
            if isinstance(item, str):
                holder[key] = self.text(item)
            elif isinstance(item, list):
                pending.extend((item, index) for index in range(len(item)))
            elif isinstance(item, dict):
                masked = {self.text(name): entry for name, entry in item.items()}
                holder[key] = masked
                pending.extend((masked, name) for name in masked)
            elif isinstance(item, int | float) and not isinstance(item, bool):
                shown = repr(item)
                if self.text(shown) != shown:
                    holder[key] = self.text(shown)
        return root[0]
