"""Where reward requests and the reward token may go (services.reward_urls): origins are
parsed and compared whole, never as string prefixes, and only http(s) URLs with a plain
host pass."""

from __future__ import annotations

import pytest

from services.reward_urls import matching_entry, may_send_token, origin, redact_url

ALLOWED = ["http://rm.internal:8000", "https://scores.example.com/base/"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://rm.internal:8000/v1/score", ("http", "rm.internal", 8000)),
        ("HTTPS://Scores.Example.com", ("https", "scores.example.com", 443)),
        ("http://10.0.0.7", ("http", "10.0.0.7", 80)),
        ("http://[::1]:9000/x", ("http", "[::1]", 9000)),
        ("http://user:pw@rm.internal:8000/", ("http", "rm.internal", 8000)),
    ],
)
def test_origins_are_scheme_host_and_port(url, expected):
    assert origin(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "spaces"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://rm.internal:70/", "http:// or https://"),
        ("ftp://rm.internal", "http:// or https://"),
        ("//rm.internal", "http:// or https://"),
        ("http://", "http:// or https://"),
        ("http://rm.internal:99999", "invalid port"),
        ("http://rm.internal:x", "invalid port"),
        ("http://%72m.internal", "not a host name"),
        ("http://rm.internal\\@evil.example", "backslashes"),
        ("http://rm.internal\n.evil.example", "control characters"),
        ("http://[::1", "not a valid URL"),
    ],
)
def test_other_urls_are_refused_with_the_reason(url, reason):
    with pytest.raises(ValueError, match=reason):
        origin(url)


@pytest.mark.parametrize(
    ("url", "entry"),
    [
        ("http://rm.internal:8000/v1/score", ALLOWED[0]),
        ("http://RM.internal:8000", ALLOWED[0]),
        ("https://scores.example.com:443/other/path", ALLOWED[1]),
        ("https://scores.example.com", ALLOWED[1]),
        # Not a prefix match: look-alike hosts, other ports, other schemes.
        ("http://rm.internal.evil.example:8000", None),
        ("http://rm.internal:8000@evil.example:8000", None),
        ("http://evil.example/http://rm.internal:8000", None),
        ("http://rm.internal:8001", None),
        ("http://rm.internal", None),
        ("https://rm.internal:8000", None),
        ("http://scores.example.com", None),
        ("http://169.254.169.254/latest/meta-data/", None),
    ],
)
def test_a_url_matches_the_entry_of_its_origin_only(url, entry):
    assert matching_entry(url, ALLOWED) == entry


def test_the_token_goes_only_to_the_origin_it_is_for():
    assert may_send_token("http://anything.example/v1/score", None)  # grpo train: trusted
    assert may_send_token("http://rm.internal:8000/v1/score", "http://rm.internal:8000")
    assert may_send_token("http://rm.internal/x", "http://rm.internal:80/")
    assert not may_send_token("http://rm.internal:8001/", "http://rm.internal:8000")
    assert not may_send_token("http://rm.internal.evil.example:8000", "http://rm.internal:8000")
    assert not may_send_token("https://rm.internal:8000", "http://rm.internal:8000")


def test_credentials_and_queries_are_redacted():
    assert redact_url("https://user:pw@rm.internal/v1/score?key=s3cret") == (
        "https://***@rm.internal/v1/score?***"
    )
    assert redact_url("http://rm.internal:8000") == "http://rm.internal:8000"
    with pytest.raises(ValueError) as refused:
        origin("gopher://user:s3cret@rm.internal")
    assert "s3cret" not in str(refused.value)
