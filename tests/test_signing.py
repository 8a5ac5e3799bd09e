"""The one signing recipe (Chatwoot's), used for Chatwoot, generic deliveries and our callbacks."""

from __future__ import annotations

import hashlib
import hmac

import httpx

from serve import signing
from serve.signing import CHATWOOT, SUPPORTBOT

SECRET = "whsec_example"
BODY = b'{"conversation_id":"c-1","message_id":"m-1","text":"where is my order"}'
NOW = 1767225600


def test_worked_example_from_the_docs():
    # The same numbers appear in docs/webhooks.md (Signature); `openssl dgst -sha256 -hmac whsec_example` agrees.
    expected = "sha256=2d4c39e4e65c62f16876e567131a73f9f6a556ee3b430dff086898ea325d3d8b"
    assert signing.compute(SECRET, str(NOW), BODY) == expected
    independent = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert expected == "sha256=" + independent


def test_sign_then_verify_round_trip_both_schemes():
    for scheme in (CHATWOOT, SUPPORTBOT):
        headers = httpx.Headers(signing.sign(SECRET, BODY, scheme, delivery_id="d-1", now=NOW))
        assert headers[scheme.delivery] == "d-1"
        assert headers[scheme.timestamp] == str(NOW)
        assert signing.verify(SECRET, headers, BODY, scheme, now=NOW + 10) is None


def test_sign_makes_a_delivery_id_when_none_is_given():
    first = signing.sign(SECRET, BODY, SUPPORTBOT, now=NOW)
    second = signing.sign(SECRET, BODY, SUPPORTBOT, now=NOW)
    assert first[SUPPORTBOT.delivery] != second[SUPPORTBOT.delivery]


def test_header_names_are_case_insensitive():
    headers = {k.lower(): v for k, v in signing.sign(SECRET, BODY, CHATWOOT, now=NOW).items()}
    assert signing.verify(SECRET, httpx.Headers(headers), BODY, CHATWOOT, now=NOW) is None


def _refusal(headers: dict[str, str], body: bytes = BODY, *, now: float = NOW, secret: str = SECRET):
    error = signing.verify(secret, httpx.Headers(headers), body, CHATWOOT, now=now)
    assert error is not None
    assert SECRET not in error.message
    return error.code


def test_refusals_name_the_reason():
    good = signing.sign(SECRET, BODY, CHATWOOT, now=NOW)
    assert _refusal({}) == "missing_signature"
    assert _refusal({CHATWOOT.signature: good[CHATWOOT.signature]}) == "missing_timestamp"
    assert _refusal({**good, CHATWOOT.timestamp: "yesterday"}) == "bad_timestamp"
    assert _refusal({**good, CHATWOOT.timestamp: "-5"}) == "bad_timestamp"
    assert _refusal(good, BODY + b" ") == "bad_signature"
    assert _refusal(good, secret="another-secret") == "bad_signature"
    assert _refusal({**good, CHATWOOT.timestamp: str(NOW + 1)}) == "bad_signature"  # the timestamp is signed
    assert _refusal({**good, CHATWOOT.signature: good[CHATWOOT.signature].upper()}) == "bad_signature"
    assert _refusal({**good, CHATWOOT.signature: good[CHATWOOT.signature][len("sha256="):]}) == "bad_signature"
    odd = {**good, CHATWOOT.signature: "sha256=\u00fcn\u00efc\u00f6d\u00e9"}  # as a server decodes latin-1 bytes
    assert signing.verify(SECRET, odd, BODY, CHATWOOT, now=NOW).code == "bad_signature"


def test_timestamp_more_than_five_minutes_off_is_stale_either_way():
    good = signing.sign(SECRET, BODY, CHATWOOT, now=NOW)
    assert signing.verify(SECRET, httpx.Headers(good), BODY, CHATWOOT, now=NOW + 300) is None
    assert signing.verify(SECRET, httpx.Headers(good), BODY, CHATWOOT, now=NOW - 300) is None
    assert _refusal(good, now=NOW + 301) == "stale_timestamp"
    assert _refusal(good, now=NOW - 301) == "stale_timestamp"


def test_the_docs_show_the_same_worked_example():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "webhooks.md").read_text(encoding="utf-8")
    assert f"Secret `{SECRET}`, timestamp `{NOW}`" in docs
    assert BODY.decode() in docs and f"({len(BODY)} bytes, no spaces)" in docs
    assert signing.compute(SECRET, str(NOW), BODY) in docs
