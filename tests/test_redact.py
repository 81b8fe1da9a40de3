"""Secret masking: every common encoding of a secret is masked, and nothing else breaks."""

from __future__ import annotations

import base64
import functools
import itertools
import json
import random
import re
import string
import urllib.parse
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corral
from corral.sandbox._redact import MASK, NO_OUTPUT, Redactor

SECRETS = ["hunter2!", "sk/live+Ab9=Zz", "pässwörd", 'tok"en\\42', "x" * 70]


def _encodings(secret: str) -> dict[str, str]:
    raw = secret.encode()
    return {
        "plain": f"token={secret};",
        "upper": secret.upper(),
        "quote": urllib.parse.quote(secret),
        "quote-lower": urllib.parse.quote(secret, safe="").lower(),
        "quote_plus": urllib.parse.quote_plus(secret),
        "json": json.dumps({"p": secret}),
        "json-utf8": json.dumps({"p": secret}, ensure_ascii=False),
        "repr": repr({"p": secret}),
        "hex": raw.hex(),
        "basic-auth": "Basic " + base64.b64encode(b"user:" + raw).decode(),
        "b64-offset-1": base64.b64encode(b"a" + raw + b"b").decode(),
        "b64-offset-2": base64.urlsafe_b64encode(b"ab" + raw).decode(),
        "encodebytes": base64.encodebytes(raw * 2).decode(),
    }


@pytest.mark.parametrize("secret", SECRETS)
def test_every_encoding_is_masked(secret):
    """The secret disappears from each encoding it commonly travels in."""
    redactor = Redactor([secret])
    for name, text in _encodings(secret).items():
        masked = redactor.text(text)
        assert MASK in masked, name
        assert secret not in masked, name


def test_unrelated_text_is_left_alone():
    """Text without the secret is returned unchanged."""
    assert Redactor(["hunter2"]).text("a normal log line") == "a normal log line"
    assert not Redactor([]) and Redactor([""]).text("x") == "x"


def test_values_are_walked_without_recursion():
    """JSON values nested deeper than Python's recursion limit are masked fine."""
    deep: object = "a tok b"
    for _ in range(5000):
        deep = [deep]
    masked = Redactor(["tok"]).value(deep)
    for _ in range(5000):
        masked = masked[0]
    assert masked == f"a {MASK} b"


def test_keys_and_numbers_are_masked():
    """A secret in a dict key or inside a number's digits is masked too."""
    assert Redactor(["tok"]).value({"tok": ["xtoky", True, None]}) == {
        MASK: [f"x{MASK}y", True, None]
    }
    assert Redactor(["12345"]).value({"n": 123456, "f": 1.5}) == {"n": f"{MASK}6", "f": 1.5}


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize(
    "encode",
    [base64.b32encode, base64.b32hexencode, base64.b85encode, base64.a85encode],
    ids=["b32", "b32hex", "b85", "a85"],
)
@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"abcd"])
def test_base32_and_base85_at_any_offset(secret, encode, prefix):
    """base32 and base85 of a value holding the secret, wherever it starts, are masked."""
    text = encode(prefix + secret.encode() + b"zz").decode()
    assert MASK in Redactor([secret]).text(text)


def test_a_secret_split_across_consecutive_texts_is_masked_in_each_piece():
    """Log lines (or output strings) that spell a secret one after another are masked
    where they hold part of it; the rest of each text stays."""
    redactor = Redactor(["hunter2-secret"])
    masked = redactor.texts(["user=hun", "ter2-se", "cret; done", "unrelated"])
    assert masked == ["user=" + MASK, MASK, MASK + "; done", "unrelated"]
    assert "".join(masked).count("hunter") == 0


def test_a_secret_split_across_output_strings_is_masked():
    """Strings that follow one another in the output, nested or not, count as consecutive."""
    redactor = Redactor(["hunter2-secret"])
    output = {"a": ["hun", {"b": "ter2-"}], "c": "secret", "d": "kept", "e": 42}
    masked = redactor.value(output)
    assert masked == {"a": [MASK, {"b": MASK}], "c": MASK, "d": "kept", "e": 42}
    assert "ter2" not in json.dumps(masked)


def test_a_secret_split_across_keys_and_from_logs_into_output_is_masked():
    """Keys count as strings in document order, and the log lines come before the output."""
    redactor = Redactor(["hunter2-secret"])
    assert redactor.value({"hunter2": "-secret"}) == {MASK: MASK}
    masked = redactor.execution([("info", "starting"), ("info", "hunter2-")], ["secret", "kept"])
    assert masked.logs == [("info", "starting"), ("info", MASK)]
    assert masked.output == [MASK, "kept"]


@pytest.mark.parametrize("secrets", [[], ["tok-live-1a2b3"]])
def test_lone_surrogates_are_escaped_in_every_field(secrets):
    """No encoder takes a lone surrogate: each field holding one is escaped, secrets or not."""
    masked = Redactor(secrets).execution(
        [("\ud800", "a\udc80")], {"k\ud800": ["v\udfff", 1]}, may_hold_surrogates=True
    )
    assert masked.logs == [("\\ud800", "a\\udc80")]
    assert masked.output == {"k\\ud800": ["v\\udfff", 1]}
    error = Redactor(secrets).execution([], error="E: \ud800 tok-live-1a2b3").error
    assert error == "E: \\ud800 " + ("tok-live-1a2b3" if not secrets else MASK)


def test_an_error_is_read_as_its_text_and_with_its_frame():
    """An error message `Type: text (line N, in fn)` joins the log lines as its text alone,
    and a secret shaped like that frame is masked whole."""
    redactor = Redactor(["tok-live-1a2b3"])
    masked = redactor.execution([("info", "tok-live-1")], error="ValueError: a2b3 (line 7, in run)")
    assert (
        masked.logs == [("info", MASK)] and masked.error == f"ValueError: {MASK} (line 7, in run)"
    )
    masked = Redactor(["Session: x1y2z3"]).execution([], error="Session: x1y2z3 (line 2)")
    assert masked.error in (f"{MASK} (line 2)", f"{MASK}{MASK} (line 2)")  # frame, text


# Property tests: a secret, in one of the encodings the module docstring lists, cut at
# random points and spread over the fields an execution sends out, is masked in every piece
# (and nothing else changes). They run at the Redactor level, so that they stay fast.

LEVEL, MESSAGE, KEY, STRING, NUMBER, ERROR = "level", "message", "key", "string", "number", "error"
# How a reader may put pieces together: every field in the order it is met (chronological:
# log lines, each level then message, then the output or the error; or as the JSON result
# lists them, the output before the log lines), or the fields of some kinds alone. Pieces
# follow one another in the reading; a field between them not read is filler or a number.
READ_ALL, READ_ALL_OUTPUT_FIRST = "all", "all, output first"
TEXT_KINDS = {MESSAGE, STRING, ERROR}
READINGS = {
    READ_ALL: {LEVEL, MESSAGE, KEY, STRING, NUMBER, ERROR},
    READ_ALL_OUTPUT_FIRST: {LEVEL, MESSAGE, KEY, STRING, NUMBER},
    "texts and keys": TEXT_KINDS | {KEY},  # and the `Type: ` and `(line N)` of the error
    "texts and numbers": TEXT_KINDS | {NUMBER},
    "texts": TEXT_KINDS,
    "levels": {LEVEL},
    "keys": {KEY},
}
# Characters whose case mappings change length or fold elsewhere, and combining marks.
TRICKY = "ßẞﬁﬂﬀİ\u0131iI\u03c2\u03c3\u03a3\u017f\u212a\u212bǅΐŉ\u0301\u0345ΰ"
SPECIAL = TRICKY + string.ascii_letters + string.digits + "-_/+=.:!\"'\\% \n"
DRAWN = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24)
TOKEN_PREFIXES = ["sk_live_", "tok-test-", "ghp_", "xoxb-", "key-"]


def _secret(rnd: random.Random, drawn: str) -> str:
    """A secret: an API token with runs of digits, or `drawn` (any characters but lone
    surrogates) with characters whose case mappings are tricky, and ASCII, put in."""
    if rnd.random() < 0.3:
        letters = string.ascii_letters + string.digits
        body = "".join(rnd.choice(letters) for _ in range(rnd.randint(4, 20)))
        return f"{rnd.choice(TOKEN_PREFIXES)}{body}{rnd.randint(0, 10**6)}{rnd.randbytes(2).hex()}"
    chars = list(drawn)
    for _ in range(rnd.randint(0, 4)):
        chars.insert(rnd.randint(0, len(chars)), rnd.choice(SPECIAL))
    return "".join(chars)


CASE_CHANGES = {
    "as is": str,
    "upper": str.upper,
    "lower": str.lower,
    "casefold": str.casefold,
    "title": str.title,
    "swapcase": str.swapcase,
}
# Encodings matched in any letter case (of the encoded text), by name.
CASELESS: dict[str, Callable[[str], str]] = {
    "quote": lambda s: urllib.parse.quote(s, safe=""),
    "quote /": urllib.parse.quote,
    "quote_plus": lambda s: urllib.parse.quote_plus(s, safe=""),
    "quote_plus /": urllib.parse.quote_plus,
    "json": lambda s: json.dumps(s)[1:-1],
    "json utf-8": lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    "repr": lambda s: repr(s)[1:-1],
    "unicode_escape": lambda s: s.encode("unicode_escape").decode("ascii"),
}
# Encodings of the secret's bytes: the first three in any letter case, the others exact.
BYTES = "utf-8", "surrogatepass"
BINARY: dict[str, Callable[[str], str]] = {
    "hex": lambda s: s.encode(*BYTES).hex(),
    "base32": lambda s: base64.b32encode(s.encode(*BYTES)).decode(),
    "base32hex": lambda s: base64.b32hexencode(s.encode(*BYTES)).decode(),
    "base64": lambda s: base64.b64encode(s.encode(*BYTES)).decode(),
    "base64 url-safe": lambda s: base64.urlsafe_b64encode(s.encode(*BYTES)).decode(),
    "base64 in a URL": lambda s: urllib.parse.quote(
        base64.b64encode(s.encode(*BYTES)).decode(), safe=""
    ),
    "base64 lines": lambda s: _lines(base64.b64encode(s.encode(*BYTES)).decode()),
    "base85": lambda s: base64.b85encode(s.encode(*BYTES)).decode(),
    "ascii85": lambda s: base64.a85encode(s.encode(*BYTES)).decode(),
}
CASE_FREE_BINARY = {"hex", "base32", "base32hex"}


def _lines(text: str, width: int = 8) -> str:
    """`text` broken into lines, as encodebytes breaks a long value (every 76 characters)."""
    return "".join(text[start : start + width] + "\n" for start in range(0, len(text), width))


def _filler(secret: str) -> str:
    """A character no form of `secret` holds (encodings use ASCII other than space only)."""
    variants = "".join(change(secret) for change in CASE_CHANGES.values())
    for char in " ·•\u3000":
        if char not in variants and char not in variants.casefold():
            return char
    raise AssertionError("unreachable: the secret is at most 24 characters")


class Field(str):
    """A text an execution sends out, tagged with what it must be once masked: part of the
    secret (`piece`) between filler (`head`, `tail`), or filler kept as it is."""

    piece: str | None = None
    head: str = ""
    tail: str = ""

    @classmethod
    def of(cls, piece: str | None = None, head: str = "", tail: str = "", text: str = "") -> Field:
        field = cls(head + piece + tail if piece is not None else text)
        field.piece, field.head, field.tail = piece, head, tail
        return field

    def expected(self, lines_free: bool) -> str:
        """The field once masked (line breaks left out when `lines_free`)."""
        if self.piece is None:
            return str(self)
        return self.head + (MASK if self.piece else "") + self.tail


def _unbroken(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


class Number(int):
    """A number in the output that is a piece of the secret."""


class Spread(NamedTuple):
    """A secret's pieces spread over what an execution sends out."""

    secret: str
    reading: str
    logs: list[tuple[Any, Any]]
    output: Any
    error: Any


@st.composite
def spread_secrets(draw: st.DrawFn, family: str) -> Spread:
    """A secret drawn, changed in case and/or encoded per `family`, cut at random points and
    at the edges of runs of digits (so that numbers occur), and spread over an execution."""
    # Hypothesis draws the characters and a seed; the rest comes from a Random seeded so:
    # far fewer draws, several times faster, still reproducible.
    drawn, seed = draw(DRAWN), draw(st.integers(0, 2**32))
    rnd = random.Random(seed)
    secret = _secret(rnd, drawn)
    if family == "case":
        text = rnd.choice(list(CASE_CHANGES.values()))(secret)
    elif family == "caseless":
        change = rnd.choice(list(CASE_CHANGES.values()))
        text = rnd.choice(list(CASELESS.values()))(change(secret))
        text = rnd.choice([str, str.upper, str.lower])(text)
    else:
        name = rnd.choice(list(BINARY))
        text = BINARY[name](secret)
        if name in CASE_FREE_BINARY:
            text = rnd.choice([str, str.upper, str.lower])(text)
    edges = [i for i in range(1, len(text)) if text[i - 1].isdigit() != text[i].isdigit()]
    cuts = [rnd.randint(0, len(text)) for _ in range(rnd.randint(0, 6))]
    cuts += rnd.sample(edges, rnd.randint(0, min(4, len(edges))))
    bounds = [0, *sorted(cuts), len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return _spread(rnd, secret, pieces)


def _spread(rnd: random.Random, secret: str, pieces: list[str]) -> Spread:
    """`pieces` placed in fields so that they follow one another in one reading: any field
    between two pieces is empty if the reading takes it, else filler (or a number)."""
    fill = _filler(secret)
    reading = rnd.choice(list(READINGS))
    kinds = READINGS[reading]
    failed = reading != READ_ALL_OUTPUT_FIRST and ERROR in kinds and rnd.random() < 0.5

    def filler() -> Field:
        return Field.of(text=fill * rnd.randint(1, 3))

    def gap(kind: str) -> Field:
        return Field.of(text="") if kind in kinds else filler()

    # The regions of the reading, in order, that may hold pieces: the error message only
    # the last piece (every reading with errors also takes messages).
    may_hold = {"log": {LEVEL, MESSAGE}, "output": {KEY, STRING}, "error": {ERROR}}
    if failed:
        places = ["log"] * (len(pieces) - 1) + [rnd.choice(["log", "error"])]
    else:
        order = ["output", "log"] if reading == READ_ALL_OUTPUT_FIRST else ["log", "output"]
        regions = [region for region in order if may_hold[region] & kinds]
        split = rnd.randint(0, len(pieces)) if len(regions) == 2 else len(pieces)
        places = [regions[0]] * split + [regions[-1]] * (len(pieces) - split)

    logs: list[tuple[Any, Any]] = []
    items: list[Any] = []
    error: Any = None
    key: Any = None
    for index, (piece, place) in enumerate(zip(pieces, places, strict=True)):
        head = filler() if index == 0 and rnd.random() < 0.5 else Field.of(text="")
        tail = filler() if index == len(pieces) - 1 and rnd.random() < 0.5 else Field.of(text="")
        field = Field.of(piece, head, tail)
        # An error as the child writes it, `Type: text (line N, in fn)`, when no form of
        # the secret can run from the frame into the text (none holds a space), from the
        # log messages into the frame ("...xv" + "ValueError: " may spell "...XV"), or sit
        # inside the frame.
        if place == "error" and " " not in secret and rnd.random() < 0.5:
            before = "".join(message for _, message in logs)
            masked = _redactor((secret,)).texts([before + FRAME_HEAD, FRAME_TAIL])
            if masked[0].endswith(FRAME_HEAD) and masked[1] == FRAME_TAIL:
                field = Field.of(piece, FRAME_HEAD + head, tail + FRAME_TAIL)
        elif place == "error" and kinds != READINGS["texts and keys"] and _framed(field):
            place = "log"  # read as a frame and text, apart but for the "texts and keys"
        if place == "error":
            error = field
            continue
        if place == "log":
            kind = rnd.choice(sorted(may_hold["log"] & kinds))
            if kind == LEVEL:
                logs.append((field, gap(MESSAGE)))
            elif logs and logs[-1][1] == "" and logs[-1][1].piece is None:
                logs[-1] = (logs[-1][0], field)  # the message of the line just begun
            else:
                logs.append((gap(LEVEL), field))
            continue
        kind = rnd.choice(sorted(may_hold["output"] & kinds))
        is_number = re.fullmatch(r"0|[1-9][0-9]{0,17}", piece) and not head + tail
        if is_number and NUMBER in kinds and rnd.random() < 0.6:
            kind = NUMBER  # a number only where it is written as the piece is
        value = Number(piece) if kind == NUMBER else field
        if kind == KEY:
            if key is not None:
                items.append({key: gap(STRING)})
            key = field
        elif key is not None:
            items.append({key: value})
            key = None
        else:
            if items and NUMBER not in kinds and rnd.random() < 0.3:
                items.append(rnd.randint(0, 99))  # a number between pieces, not read
            items.append(value)
    if key is not None:
        items.append({key: gap(STRING)})

    def wrapped(item: Any) -> Any:  # nesting that changes no order
        for _ in range(rnd.randint(0, 2)):
            item = [item] if rnd.random() < 0.5 else {gap(KEY): item}
        return item

    def some_filler(region: str) -> list[Any]:
        """Filler before or after all the pieces in `region`, if no piece is on the other
        side of it in the reading."""
        count = rnd.randint(0, 2)
        if region == "log":
            return [(filler(), filler()) for _ in range(count)]
        return [filler() for _ in range(count)]

    pieces_in = {region: region in places for region in ("log", "output", "error")}
    first, second = ("output", "log") if reading == READ_ALL_OUTPUT_FIRST else ("log", "output")
    if failed:
        second = "error"
    before_first = some_filler(first)
    after_first = some_filler(first) if not pieces_in[second] else []
    before_second = some_filler(second) if not pieces_in[first] else []
    after_second = some_filler(second) if second != "error" else []
    body = {"log": logs, "output": [wrapped(item) for item in items]}
    if second == "error":
        body["error"] = error if error is not None else filler()
        logs = before_first + logs + after_first
        return Spread(secret, reading, logs, NO_OUTPUT, body["error"])
    regions_out = {
        first: before_first + body[first] + after_first,
        second: before_second + body[second] + after_second,
    }
    return Spread(secret, reading, regions_out["log"], regions_out["output"], None)


FRAME_HEAD, FRAME_TAIL = "ValueError: ", " (line 3, in run)"


def _framed(error: str) -> bool:
    """Whether `error` reads as `Type: message` or `message (line N)`, as the child writes
    an exception: the texts alone are read without that frame."""
    return bool(re.match(r"[A-Za-z_][\w.]*: ", error) or re.search(r" \(line \d+.*\)\Z", error))


def _fields(value: Any) -> list[Any]:
    """The keys, strings and numbers of a JSON value in document order (a key first)."""
    if isinstance(value, list):
        return [field for item in value for field in _fields(item)]
    if isinstance(value, dict):
        return [field for key, item in value.items() for field in [key, *_fields(item)]]
    return [value]


_redactor = functools.lru_cache(maxsize=256)(Redactor)  # examples often share a secret


def _check(spread: Spread, lines_free: bool) -> None:
    """Mask `spread` as an execution's output and check every field."""
    expected_output = _fields(spread.output) if spread.output is not NO_OUTPUT else []
    masked = _redactor((spread.secret,)).execution(spread.logs, spread.output, spread.error)
    fields = [*(text for line in spread.logs for text in line)]
    shown = [*(text for line in masked.logs for text in line)]
    fields += expected_output
    shown += _fields(masked.output) if spread.output is not NO_OUTPUT else []
    if spread.error is not None:
        fields.append(spread.error)
        shown.append(masked.error)
    assert len(fields) == len(shown)
    for field, text in zip(fields, shown, strict=True):
        if isinstance(field, Field):
            want = field.expected(lines_free)
            got = _unbroken(text) if lines_free and field.piece is not None else text
            if lines_free and field.piece is not None and not _unbroken(field.piece):
                want = got if got == field.head + field.tail else want  # a line break alone
            assert got == want, (spread.secret, spread.reading, fields, shown)
        elif isinstance(field, Number):  # a number that is a piece (others may be masked)
            assert text == MASK, (spread.reading, fields, shown)


PROPERTY_SETTINGS = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.timeout(300)
@settings(PROPERTY_SETTINGS, max_examples=4000)
@given(spread_secrets("case"))
def test_a_secret_in_any_case_spread_over_an_execution_is_masked_in_every_piece(spread):
    """The secret as it is or through upper, lower, casefold, title or swapcase (which may
    change its length: "ß" becomes "SS"), cut and spread over log levels and messages, output
    keys, strings and numbers and the error message, is masked in each piece."""
    _check(spread, lines_free=False)


@pytest.mark.timeout(300)
@settings(PROPERTY_SETTINGS, max_examples=3000)
@given(spread_secrets("caseless"))
def test_a_secret_percent_or_escape_encoded_and_spread_is_masked_in_every_piece(spread):
    """Percent-encoded or JSON/Python-escaped, after any case change and in any letter case
    of the encoding, cut and spread: masked in each piece."""
    _check(spread, lines_free=False)


@pytest.mark.timeout(300)
@settings(PROPERTY_SETTINGS, max_examples=3000)
@given(spread_secrets("binary"))
def test_a_secret_hex_base32_base64_or_base85_encoded_and_spread_is_masked_in_every_piece(
    spread,
):
    """hex and base32 (any letter case), base64 (standard, URL-safe, in a URL, in lines) and
    base85, cut and spread: masked in each piece (the line breaks of base64 may stay)."""
    _check(spread, lines_free=True)


# End to end, through a real sandbox on both executors (the `sandbox` fixture): the three
# ways a secret slipped past the mask before the one-pass masking.


def _everything(result: Any) -> str:
    """All an execution sent out, as the JSON result shows it."""
    if isinstance(result, corral.SandboxError):
        return json.dumps([result.message, [[e.level, e.message] for e in result.logs]])
    return json.dumps([result.output, [[e.level, e.message] for e in result.logs]])


def test_a_secret_split_across_log_levels_is_masked(sandbox):
    """Pieces of a secret given as the `level` of consecutive log() calls are masked, with
    messages between them or not, and the rest of each line stays."""
    secret = "tok-live-9f8e7d6c"
    code = (
        "def run(params, context):\n"
        "    s = context['token']\n"
        "    log('one', level=s[:5])\n    log('two', level=s[5:11])\n"
        "    log('three', level=s[11:])\n"
        "    log('', level=s[:8])\n    log('', level=s[8:])\n"
        "    log('x ' + s[:6])\n    log('', level=s[6:])\n"
        "    return 'done'\n"
    )
    result = sandbox.execute_sync(code, context={"token": secret}, secrets=[secret])
    shown = _everything(result)
    assert "9f8e7d6c" not in shown and "live" not in shown and "tok-" not in shown, shown
    assert [(e.level, e.message) for e in result.logs][:3] == [
        (MASK, "one"),
        (MASK, "two"),
        (MASK, "three"),
    ]
    assert result.logs[5].message == "x " + MASK and result.output == "done"


def test_a_secret_split_across_strings_and_a_number_is_masked(sandbox):
    """A secret returned as strings with a number between them (`["tok-live-", 1, "a2b3"]`),
    or logged so, or ending in the error message, is masked in each piece."""
    secret = "tok-live-1a2b3"
    code = (
        "def run(params, context):\n"
        "    s = context['token']\n"
        "    log(s[:9])\n    log(s[9:])\n"
        "    if params.get('fail'):\n"
        "        log(s[:10])\n"
        "        raise ValueError(s[10:])\n"
        "    return {'pieces': [s[:9], int(s[9]), s[10:]], 'n': 42}\n"
    )
    result = sandbox.execute_sync(code, context={"token": secret}, secrets=[secret])
    assert result.output["pieces"] == [MASK, MASK, MASK]
    assert result.output["n"] == 42
    assert "a2b3" not in _everything(result) and "tok-live" not in _everything(result)
    with pytest.raises(corral.SandboxError) as caught:
        sandbox.execute_sync(
            code, params={"fail": True}, context={"token": secret}, secrets=[secret]
        )
    assert "a2b3" not in _everything(caught.value), _everything(caught.value)
    assert caught.value.logs[-1].message == MASK


def test_a_secret_changed_by_a_length_changing_case_mapping_is_masked(sandbox):
    """`"straße".upper()` is "STRASSE" and casefold() gives "strasse": both are masked in
    the output, the logs and the error message, also percent-encoded."""
    secret = "straße-tok-42"
    code = (
        "import urllib.parse\n"
        "def run(params, context):\n"
        "    s = context['token']\n"
        "    log(s.upper(), level=s.casefold())\n"
        "    if params.get('fail'):\n"
        "        raise ValueError('bad token ' + s.upper())\n"
        "    return {'upper': s.upper(), 'folded': s.casefold(), 'title': s.title(),\n"
        "            'quoted': urllib.parse.quote(s.upper()), 'ok': 'STRASSE'}\n"
    )
    result = sandbox.execute_sync(code, context={"token": secret}, secrets=[secret])
    assert result.output == {
        "upper": MASK,
        "folded": MASK,
        "title": MASK,
        "quoted": MASK,
        "ok": "STRASSE",
    }
    assert (result.logs[0].level, result.logs[0].message) == (MASK, MASK)
    with pytest.raises(corral.SandboxError) as caught:
        sandbox.execute_sync(
            code, params={"fail": True}, context={"token": secret}, secrets=[secret]
        )
    assert "STRASSE" not in caught.value.message and MASK in caught.value.message
