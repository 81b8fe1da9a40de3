"""Masking of secrets in everything that leaves the sandbox. Host side."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterable
from typing import Any

MASK = "[redacted]"


def _forms(secret: str) -> set[str]:
    """The secret and the encodings it commonly travels in."""
    raw = secret.encode()
    forms = {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret, safe=""),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    }
    forms |= {form.rstrip("=") for form in forms}
    return {form for form in forms if form}


class Redactor:
    """Replaces every secret (and its URL and base64 forms) with a mask."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= _forms(secret)
        # Longest first, so a secret that contains another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def text(self, text: str) -> str:
        """`text` with every secret masked."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def value(self, value: Any) -> Any:
        """A JSON value with every string (keys too) and number holding a secret masked."""
        if not self._forms:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(key)): self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):
            shown = repr(value)
            return self.text(shown) if self.text(shown) != shown else value
        return value
