"""Masking of secrets in everything that leaves the sandbox. Host side.

Each secret is masked as itself and in the encodings it commonly travels in:
percent-encoding (`/` kept or not, `+` for spaces), JSON and Python string
escapes, hex and base32, all in any letter case; and base64 (standard and
URL-safe, also percent-encoded) and base85, case-exact. "Any letter case"
compares full case folds (`casefold` after canonical decomposition), so a
case mapping that changes the length (`"straße".upper()` is `"STRASSE"`) is
caught; the percent and escaped forms are also masked after the whole secret
went through `upper`, `lower`, `casefold`, `title` or `swapcase`. Encoded
forms are found at any byte offset inside a longer encoded value (`Basic
base64(user:secret)`) and across the line breaks of `encodebytes`.

Everything an execution sends out goes through one masking pass: each log
line's level and message, the output's keys, strings and numbers (as JSON
writes them, `true`, `false` and `null` too), and the error message. A secret
split into pieces is masked in each piece that holds part of it when the
pieces follow one another in one of these readings: every field in the order
a reader meets it (the log lines, each level then message, then the output or
the error; and the output before the log lines, as the JSON result lists
them), the error read as its own text, without the `Type: ` before it and the
` (line N, in fn)` after it; the texts alone (messages, output strings, the
error's own text), with the keys (and the error's frame), with the output's
numbers, or with neither; the levels alone; the keys alone. What is not
caught: a secret the code transformed some other way (reversed, interleaved
with other text, encrypted, encoded after changing the case of some of its
letters only).
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
import urllib.parse
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, repeat
from typing import Any, NamedTuple

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


CASE_MAPS: tuple[Callable[[str], str], ...] = (
    str.upper,
    str.lower,
    str.casefold,
    str.title,
    str.swapcase,
)


class _Folds(dict[str, str]):
    """Each character's full case fold, decomposed: what caseless matching compares."""

    def __missing__(self, char: str) -> str:
        if len(self) > 65536:  # bounded: connector text may hold any of a million characters
            self.clear()
        decomposed = unicodedata.normalize("NFD", char)
        # The one character whose upper case folds elsewhere: dotless i, whose upper
        # case is "I".
        folded = unicodedata.normalize("NFD", decomposed.casefold()).replace("\u0131", "i")
        self[char] = folded
        return folded


_FOLDS = _Folds()


def fold(text: str) -> tuple[str, list[int] | None]:
    """`text` folded for caseless matching, and where each folded character comes from in
    `text` (None when they line up one to one). Folding may lengthen a text: "ß" is "ss"."""
    if text.isascii():
        return text.lower(), None
    parts = list(map(_FOLDS.__getitem__, text))
    folded = "".join(parts)
    if len(folded) == len(text):  # no fold is empty, so every character folded to one
        return folded, None
    return folded, list(chain.from_iterable(repeat(i, len(p)) for i, p in enumerate(parts)))


class Masked(NamedTuple):
    """What an execution sends out, masked."""

    logs: list[tuple[str, str]]
    output: Any
    error: str | None


NO_OUTPUT: Any = object()  # `output` of an execution that ended with an error

# The kinds of field an execution sends out, and the readings a secret's pieces are
# looked for in: every field, then the fields of some kinds alone.
LEVEL, MESSAGE, KEY, STRING, SCALAR, ERROR, FRAME = range(7)
TEXTS = frozenset({MESSAGE, STRING, ERROR})
# An error message as the child writes one: `Type: message (line N, in fn)`. The type and
# the place frame the message: the texts are read without them.
ERROR_FRAME = re.compile(r"([A-Za-z_][\w.]{0,200}: )?(.*?)( \(line \d+(?:, in [^()]*)?\))?", re.S)
READINGS = (TEXTS | {KEY, FRAME}, TEXTS | {SCALAR}, TEXTS, frozenset({LEVEL}), frozenset({KEY}))


class _Forms:
    """Forms of secrets matched one way: the regex of those a text may hold."""

    def __init__(self, forms: dict[str, str]) -> None:
        # Longest first, so a form that contains another is masked whole.
        self._forms = sorted(forms.items(), key=lambda entry: len(entry[0]), reverse=True)
        self._patterns: dict[tuple[int, ...], re.Pattern[str]] = {}

    def __bool__(self) -> bool:
        return bool(self._forms)

    def pattern(self, haystack: str) -> re.Pattern[str] | None:
        """The regex of the forms found in `haystack` by a plain substring test (most texts
        hold no secret at all), or None."""
        present = tuple(i for i, (needle, _) in enumerate(self._forms) if needle in haystack)
        if not present:
            return None
        if present not in self._patterns:
            if len(self._patterns) > 64:
                self._patterns.clear()
            # In a lookahead, so that matches may overlap: "aba" is found twice in "ababa".
            alternatives = "|".join(self._forms[i][1] for i in present)
            self._patterns[present] = re.compile(f"(?=({alternatives}))")
        return self._patterns[present]


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
            caseless |= {secret, raw.hex()}
            # A case change leaves an ASCII secret's percent and escaped forms as they
            # were, up to case; a non-ASCII letter's escapes change with its case.
            variants = {secret} if secret.isascii() else {secret, *(m(secret) for m in CASE_MAPS)}
            for variant in variants:
                caseless |= _percent_forms(variant) | _escaped_forms(variant)
            encoded_exact, encoded_caseless = _encoded_forms(raw)
            exact |= encoded_exact
            caseless |= encoded_caseless
        # Most forms match in any case (a lower-cased secret is still a leak, and so is
        # %2f for %2F): they are folded, and so is the text they are looked for in.
        # base64 and base85 are case-exact but may be broken into lines.
        self._active = bool(caseless or exact)
        if self._active:
            folded = {fold(form)[0] for form in caseless if form}
            self._caseless = _Forms({form: re.escape(form) for form in folded})
            self._exact = _Forms({form: "\r?\n?".join(map(re.escape, form)) for form in exact})

    def __bool__(self) -> bool:
        return self._active

    def text(self, text: str) -> str:
        """`text` with every secret masked and lone surrogates escaped."""
        return self.fields([text], [[0]])[0]

    def texts(self, texts: list[str]) -> list[str]:
        """Each text masked, and the parts of a secret split across consecutive texts too."""
        return self.fields(texts, [list(range(len(texts)))])

    def value(self, value: Any) -> Any:
        """A JSON value masked as an execution's output (see `execution`)."""
        return self.execution([], value).output

    def execution(
        self,
        logs: Sequence[tuple[str, str]],
        output: Any = NO_OUTPUT,
        error: str | None = None,
        *,
        may_hold_surrogates: bool = True,
    ) -> Masked:
        """Everything an execution sends out masked in one pass: the (level, message) log
        lines, the output (a JSON value as json.loads makes it: its keys, strings and
        numbers) or the error message. Pieces of a secret are looked for in the readings
        the module docstring lists. Masked numbers become strings.

        The output is masked in place (returned as it is when there is nothing to mask or
        escape) and walked without recursion: it may be nested as deep as JSON allows.
        """
        if not self._active and not may_hold_surrogates:  # the common case: kept cheap
            return Masked(
                logs=[(encodable(level), encodable(text)) for level, text in logs],
                output=None if output is NO_OUTPUT else output,
                error=None if error is None else encodable(error),
            )
        root = [output]
        walk = output is not NO_OUTPUT
        slots = _slots(root) if walk else []
        texts = [text for entry in logs for text in entry]
        kinds = [LEVEL, MESSAGE] * len(logs)
        texts += [text for _, _, _, text in slots]
        kinds += [kind for _, _, kind, _ in slots]
        if error is not None:
            framed = ERROR_FRAME.fullmatch(error)
            assert framed is not None  # every part may be empty
            texts += [framed[1] or "", framed[2], framed[3] or ""]
            kinds += [FRAME, ERROR, FRAME]
        chronological = list(range(len(texts)))
        readings = []
        if self._active:
            shown = list(range(2 * len(logs), 2 * len(logs) + len(slots)))
            logged = list(range(2 * len(logs)))
            after = [index for index in chronological[len(logged) :] if kinds[index] != FRAME]
            readings.append(shown + logged + after)
            for chosen in READINGS:
                reading = [index for index in chronological if kinds[index] in chosen]
                if len(reading) > 1 and reading not in readings:
                    readings.append(reading)
        masked = self.fields(texts, readings)
        renames: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
        for (holder, key, kind, before), after in zip(
            slots, masked[2 * len(logs) :][: len(slots)], strict=True
        ):
            if after == before:
                continue
            if kind == KEY:
                renames.setdefault(id(holder), (holder, {}))[1][key] = after
            else:
                holder[key] = after
        for holder, names in renames.values():  # rebuilt in place, in the same order
            items = list(holder.items())
            holder.clear()
            holder.update((names.get(name, name), entry) for name, entry in items)
        return Masked(
            logs=[(masked[i], masked[i + 1]) for i in range(0, 2 * len(logs), 2)],
            output=None if output is NO_OUTPUT else root[0],
            error="".join(masked[-3:]) if error is not None else None,
        )

    def fields(self, texts: list[str], readings: list[list[int]]) -> list[str]:
        """`texts` masked: each on its own, and a secret running across the texts that
        follow one another in a reading (a list of indices into `texts`; an index may come
        more than once) masked in each text that holds part of it."""
        if not self._active:
            return list(map(encodable, texts))
        readings = readings or [[index] for index in range(len(texts))]
        raws = ["".join([texts[i] for i in reading]) for reading in readings]
        everything = "\x00".join(raws)
        ascii_only = everything.isascii()  # then folding is lower(), and lines up
        if ascii_only:
            folds: list[tuple[str, list[int] | None]] | None = None
            foldeds = [raw.lower() for raw in raws]
        else:
            folds = [fold(text) for text in texts]
            foldeds = ["".join([folds[i][0] for i in reading]) for reading in readings]
        escape = (lambda text: text) if ascii_only else encodable
        exact = self._exact.pattern(everything.replace("\r", "").replace("\n", ""))
        caseless = self._caseless.pattern("\x00".join(foldeds))
        if exact is None and caseless is None:
            return texts if ascii_only else list(map(encodable, texts))
        spans: list[list[tuple[int, int]]] = [[] for _ in texts]
        for reading, raw, folded in zip(readings, raws, foldeds, strict=True):
            lengths = [len(texts[i]) for i in reading]
            if exact is not None:
                _collect(exact, raw, reading, lengths, None, spans)
            if caseless is not None and folds is not None:
                lengths = [len(folds[i][0]) for i in reading]
            if caseless is not None:
                _collect(caseless, folded, reading, lengths, folds, spans)
        return [
            escape(_cut(text, found) if found else text)
            for text, found in zip(texts, spans, strict=True)
        ]


def _collect(
    pattern: re.Pattern[str],
    joined: str,
    reading: list[int],
    lengths: list[int],
    folds: list[tuple[str, list[int] | None]] | None,
    spans: list[list[tuple[int, int]]],
) -> None:
    """Add to `spans` (per text, in its own characters) where `pattern` matches in
    `joined`, the texts of `reading` (of `lengths`, folded when `folds` is given) joined."""
    starts, total = [], 0
    for length in lengths:
        starts.append(total)
        total += length
    for match in pattern.finditer(joined):
        begin, end = match.span(1)
        first = bisect_right(starts, begin) - 1
        last = bisect_right(starts, end - 1) - 1
        for place in range(first, last + 1):
            lo = max(begin, starts[place]) - starts[place]
            hi = min(end, starts[place] + lengths[place]) - starts[place]
            if hi <= lo:
                continue
            index = reading[place]
            origin = folds[index][1] if folds is not None else None
            if origin is not None:
                lo, hi = origin[lo], origin[hi - 1] + 1
            spans[index].append((lo, hi))


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each of `spans` (merged where they overlap or touch) replaced by MASK."""
    pieces, cursor = [], 0
    for begin, end in sorted(spans):
        if begin > cursor or not pieces:
            pieces += [text[cursor:begin], MASK]
        cursor = max(cursor, end)
    return "".join(pieces) + text[cursor:]


def _scalar(item: Any) -> str | None:
    """A number, true, false or null as JSON writes it; None for anything else."""
    if item is True:
        return "true"
    if item is False:
        return "false"
    if item is None:
        return "null"
    if isinstance(item, int | float):
        return repr(item)  # the output is finite (no NaN): repr is how JSON writes it
    return None


def _slots(root: list[Any]) -> list[tuple[Any, Any, int, str]]:
    """Every field of the JSON value `root[0]` in document order (a key before its
    value), as (container, key or index, kind, text). Walks without recursion."""
    slots: list[tuple[Any, Any, int, str]] = []
    add = slots.append
    stack: list[tuple[Any, Iterator[Any], bool]] = [(root, iter((0,)), False)]
    while stack:
        holder, keys, is_dict = stack[-1]
        for key in keys:
            if is_dict:
                add((holder, key, KEY, key))
            item = holder[key]
            if isinstance(item, str):
                add((holder, key, STRING, item))
            elif isinstance(item, list):
                stack.append((item, iter(range(len(item))), False))
                break  # its items come next; this container's rest after them
            elif isinstance(item, dict):
                stack.append((item, iter(list(item)), True))
                break
            else:
                shown = _scalar(item)
                if shown is not None:
                    add((holder, key, SCALAR, shown))
        else:
            stack.pop()
    return slots
