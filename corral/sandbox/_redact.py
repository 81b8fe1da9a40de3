"""Masking of secrets in everything that leaves the sandbox. Host side.

Each secret is masked as itself and in the encodings it commonly travels in:
percent-encoding (`/` kept or not, `+` for spaces), JSON and Python string
escapes, hex and base32, all in any letter case; and base64 (standard and
URL-safe, also percent-encoded) and base85, case-exact. Encoded forms are
found at any byte offset inside a longer encoded value (`Basic
base64(user:secret)`) and across the line breaks of `encodebytes`. A secret
split into consecutive pieces (log lines one after another, strings one after
another in the output) is masked in each piece that holds part of it. What
is not caught: a secret the code transformed some other way (reversed,
interleaved with other text, encrypted).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

MASK = "[redacted]"
MIN_ENCODED_CORE = 6  # shorter fragments of an encoding would match unrelated text


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


def _cores(raw: bytes, encode: Callable[[bytes], bytes], block: int, bits: int) -> set[str]:
    """The runs of encoded characters fixed by `raw` alone, wherever it sits in a longer value.

    `block` is the encoding's input block in bytes. A base64 or base32
    character carries `bits` bits of its own; a base85 character (bits 0)
    depends on its whole block, so only whole blocks inside `raw` count.
    """
    forms = {encode(raw).decode()}
    pad = b"\xff"  # not zero: a85encode writes an all-zero block as "z"
    for offset in range(block):
        encoded = encode(pad * offset + raw + pad * block).decode()
        if bits:
            first = -(-8 * offset // bits)  # the first character made of secret bits only
            last = 8 * (offset + len(raw)) // bits  # one past the last such character
        else:
            first = -(-offset // block) * 5
            last = (offset + len(raw)) // block * 5
        core = encoded[first:last]
        if len(core) >= (MIN_ENCODED_CORE if bits else 5):  # one base85 block is 5 characters
            forms.add(core)
    return forms


def _encoded_forms(raw: bytes) -> tuple[set[str], set[str]]:
    """`raw` in base64 and base85 (case-exact forms) and in base32 (case-free forms)."""
    exact: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        exact |= _cores(raw, encode, 3, 6)
    exact |= {urllib.parse.quote(form, safe="") for form in exact}  # base64 inside a URL
    for encode in (base64.b85encode, base64.a85encode):
        exact |= _cores(raw, encode, 4, 0)
    caseless: set[str] = set()
    for encode in (base64.b32encode, base64.b32hexencode):
        caseless |= _cores(raw, encode, 5, 5)
    return exact, caseless


def encodable(text: str) -> str:
    """`text` with lone surrogates (which no encoder takes) written as backslash escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class Redactor:
    """What every text leaving the sandbox passes through: secrets masked, in every form
    it knows, and lone surrogates escaped."""

    def __init__(self, secrets: Iterable[str]) -> None:
        caseless: set[str] = set()
        exact: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            raw = secret.encode("utf-8", "surrogatepass")
            caseless |= {secret, raw.hex()} | _percent_forms(secret) | _escaped_forms(secret)
            encoded_exact, encoded_caseless = _encoded_forms(raw)
            exact |= encoded_exact
            caseless |= encoded_caseless
        # Longest first, so a form that contains another is masked whole. Most forms
        # match in any case (a lower-cased secret is still a leak, and so is %2f for
        # %2F); base64 and base85 are case-exact but may be broken into lines.
        # Each form with the regex that finds it and the plain string a text must contain
        # for the regex to match there (checked first: most texts hold no secret at all).
        self._forms = sorted(
            [(form, f"(?i:{re.escape(form)})", form.lower(), True) for form in caseless if form]
            + [(form, "\r?\n?".join(map(re.escape, form)), form, False) for form in exact],
            key=lambda entry: len(entry[0]),
            reverse=True,
        )
        self._pattern = (
            re.compile("|".join(entry[1] for entry in self._forms)) if self._forms else None
        )
        self._patterns: dict[tuple[int, ...], re.Pattern[str]] = {}

    def __bool__(self) -> bool:
        return self._pattern is not None

    def _pattern_for(self, text: str) -> re.Pattern[str] | None:
        """The regex of the forms `text` may hold: a plain substring test rules out the
        others (exact for ASCII text; any other text gets every form)."""
        if self._pattern is None or not text.isascii():
            return self._pattern
        lowered, flat = text.lower(), text.replace("\n", "").replace("\r", "")
        present = tuple(
            index
            for index, (_, _, needle, caseless) in enumerate(self._forms)
            if not needle.isascii() or needle in (lowered if caseless else flat)
        )
        if not present:
            return None
        if present not in self._patterns:
            if len(self._patterns) > 64:
                self._patterns.clear()
            joined = "|".join(self._forms[index][1] for index in present)
            self._patterns[present] = re.compile(joined)
        return self._patterns[present]

    def text(self, text: str) -> str:
        """`text` with every secret masked and lone surrogates escaped."""
        return self._masker([text])(text)

    def _masker(self, texts: list[str]) -> Callable[[str], str]:
        """What masks each of `texts`: the forms any of them may hold are found once, over
        all of them (not once per text: an output may hold a million short strings)."""
        pattern = self._pattern_for("\x00".join(texts)) if self._pattern is not None else None
        if pattern is None:
            return encodable
        return lambda text: encodable(pattern.sub(MASK, text))

    def texts(self, texts: list[str]) -> list[str]:
        """Each text masked, and the parts of a secret split across consecutive texts too."""
        mask = self._masker(texts)
        masked = [mask(text) for text in texts]
        if self._pattern is None or len(masked) < 2:
            return masked
        joined = "".join(masked)
        pattern = self._pattern_for(joined)
        spans = [match.span() for match in pattern.finditer(joined)] if pattern else []
        if not spans:
            return masked
        result, start, first = [], 0, 0  # spans come in order and do not overlap
        for text in masked:
            end = start + len(text)
            while first < len(spans) and spans[first][1] <= start:
                first += 1  # spans wholly before this text are done with
            pieces, cursor, index = [], start, first
            while index < len(spans) and spans[index][0] < end:
                cut_start, cut_end = max(spans[index][0], start), min(spans[index][1], end)
                pieces += [text[cursor - start : cut_start - start], MASK]
                cursor = cut_end
                index += 1
            result.append("".join(pieces) + text[cursor - start :] if pieces else text)
            start = end
        return result

    def value(
        self, value: Any, *, may_hold_surrogates: bool = True, before: list[str] | None = None
    ) -> Any:
        """A JSON value (as json.loads makes it) passed through `text` in strings, keys and
        numbers, and masked where a secret runs across strings (keys and values, in
        document order, after the texts `before`: an execution's log lines). Returned as
        it is when there is nothing to mask or escape; `before` is masked in place.

        Walks without recursion: the output may be nested as deep as JSON allows.
        """
        if self._pattern is None and not may_hold_surrogates:
            if before:
                before[:] = [self.text(text) for text in before]
            return value
        root = [value]
        mask = self._masker(_strings(value))
        pending: list[tuple[Any, Any]] = [(root, 0)]
        while pending:
            holder, key = pending.pop()
            item = holder[key]
            if isinstance(item, str):
                holder[key] = mask(item)
            elif isinstance(item, list):
                pending.extend((item, index) for index in range(len(item)))
            elif isinstance(item, dict):
                masked = {mask(name): entry for name, entry in item.items()}
                holder[key] = masked
                pending.extend((masked, name) for name in masked)
            elif isinstance(item, int | float) and not isinstance(item, bool):
                shown = repr(item)
                if mask(shown) != shown:
                    holder[key] = mask(shown)
        if self._pattern is not None:
            self._across_strings(root, before if before is not None else [])
        elif before:
            before[:] = [self.text(text) for text in before]
        return root[0]

    def _across_strings(self, root: list[Any], before: list[str]) -> None:
        """Mask a secret split across the texts `before` and the strings of `root[0]` (keys
        and values), taken one after another in document order."""
        slots: list[tuple[Any, Any, bool]] = []  # (container, key or index, is a dict key)
        pending: list[tuple[Any, Any, bool]] = [(root, 0, False)]
        while pending:  # depth first, in document order
            holder, key, is_key = pending.pop()
            item = key if is_key else holder[key]
            if isinstance(item, str):
                slots.append((holder, key, is_key))
            elif isinstance(item, list):
                pending.extend((item, index, False) for index in reversed(range(len(item))))
            elif isinstance(item, dict):
                for name in reversed(list(item)):
                    pending += [(item, name, False), (item, name, True)]  # the key comes first
        values = [(holder, key) for holder, key, is_key in slots if not is_key]
        masked = self.texts(before + [holder[key] for holder, key in values])
        before[:] = masked[: len(before)]  # values alone, then keys and values together:
        for (holder, key), text in zip(values, masked[len(before) :], strict=True):
            holder[key] = text  # either is how a reader might put the pieces together
        masked = self.texts(before + [key if is_key else h[key] for h, key, is_key in slots])
        before[:] = masked[: len(before)]
        renames: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
        for (holder, key, is_key), text in zip(slots, masked[len(before) :], strict=True):
            if not is_key:
                holder[key] = text
            elif text != key:
                renames.setdefault(id(holder), (holder, {}))[1][key] = text
        for holder, names in renames.values():  # rebuilt in place, in the same order
            items = list(holder.items())
            holder.clear()
            holder.update((names.get(name, name), entry) for name, entry in items)


def _strings(value: Any) -> list[str]:
    """Every string of a JSON value (keys, values, numbers as written), for a pre-check."""
    found: list[str] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            found.extend(item)
            pending.extend(item.values())
        elif isinstance(item, int | float) and not isinstance(item, bool):
            found.append(repr(item))
    return found
