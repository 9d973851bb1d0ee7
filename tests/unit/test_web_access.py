"""The HTTP side's access rules, request by request (aiohttp's mocked requests), and
the address parsing of ``--http``."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aiobus.web import is_loopback, parse_address
from aiobus.web.server import _Access

TOKEN = "s3cret-token"


def check(access: _Access, *, admin: bool = False, contents: bool = False,
          **headers: str) -> int:
    request = make_mocked_request("GET", "/", headers={"Host": "127.0.0.1:9180", **headers})
    try:
        access.check(request, admin=admin, contents=contents)
    except web.HTTPException as exc:
        return exc.status
    return 200


def test_loopback_reads_counts_freely_but_not_contents_or_admin() -> None:
    access = _Access(TOKEN, loopback=True)
    assert check(access) == 200
    assert check(access, contents=True) == 401
    assert check(access, admin=True) == 401
    assert check(access, admin=True, **{"X-Aiobus-Token": "wrong"}) == 401
    assert check(access, admin=True, **{"X-Aiobus-Token": TOKEN}) == 200
    assert check(access, admin=True, Authorization=f"Bearer {TOKEN}") == 200


def test_beyond_loopback_everything_needs_the_token() -> None:
    access = _Access(TOKEN, loopback=False)
    assert check(access, Host="10.0.0.5:9180") == 401
    assert check(access, Host="10.0.0.5:9180", Authorization=f"Bearer {TOKEN}") == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "http://127.0.0.1:9999"},  # another port is another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Host": "evil.example:9180"},  # DNS rebinding to 127.0.0.1
])
def test_cross_site_is_refused_even_with_the_token(headers: dict[str, str]) -> None:
    access = _Access(TOKEN, loopback=True)
    assert check(access, admin=True, **{"X-Aiobus-Token": TOKEN, **headers}) == 403


def test_same_origin_passes() -> None:
    access = _Access(TOKEN, loopback=True)
    assert check(access, admin=True, Origin="http://127.0.0.1:9180",
                 **{"Sec-Fetch-Site": "same-origin", "X-Aiobus-Token": TOKEN}) == 200


@pytest.mark.parametrize(("text", "expected"), [
    ("9180", ("127.0.0.1", 9180)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("0.0.0.0:9180", ("0.0.0.0", 9180)),
    ("[::1]:9180", ("::1", 9180)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", [":9180", "host:", "host:http", "1:70000"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
