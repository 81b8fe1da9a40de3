"""Secret masking: every common encoding of a secret is masked, and nothing else breaks."""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from corral.sandbox._redact import MASK, Redactor

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
