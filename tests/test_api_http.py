"""HTTP framing without sockets: what the parser accepts, and what it refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.api.http import (
    MAX_HEADER_BYTES,
    ContinueExpected,
    ProtocolError,
    Request,
    RequestReader,
    encode_response,
)


def read_all(data: bytes, max_payload: int = 51_200) -> list[object]:
    reader = RequestReader(max_payload)
    reader.feed(data)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


def test_a_put_with_a_body() -> None:
    raw = b'PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{"state":"Paused"}'
    [request] = read_all(raw)
    assert request == Request(
        "PUT",
        "/vm",
        {"host": "x", "content-length": "18"},
        b'{"state":"Paused"}',
        keep_alive=True,
    )


def test_pipelined_requests_arrive_in_order_and_byte_by_byte() -> None:
    raw = b"GET / HTTP/1.1\r\n\r\n" + b"GET /machine-config?x=1 HTTP/1.1\r\n\r\n"
    reader = RequestReader()
    events = []
    for byte in raw:
        reader.feed(bytes([byte]))
        while (event := reader.next_event()) is not None:
            events.append(event)
    assert [e.path for e in events if isinstance(e, Request)] == [
        "/",
        "/machine-config",
    ]
    assert reader.idle


def test_connection_close_and_http_1_0() -> None:
    [close] = read_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    [old] = read_all(b"GET / HTTP/1.0\r\n\r\n")
    [old_kept] = read_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert isinstance(close, Request) and not close.keep_alive
    assert isinstance(old, Request) and not old.keep_alive
    assert isinstance(old_kept, Request) and old_kept.keep_alive


def test_expect_100_continue_is_announced_once_before_the_body() -> None:
    reader = RequestReader()
    reader.feed(
        b"PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert reader.next_event() == ContinueExpected()
    assert reader.next_event() is None
    reader.feed(b"{}")
    assert isinstance(reader.next_event(), Request)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GARBAGE\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
        (b"GET noslash HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "malformed header line"),
        (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "not a number"),
        (b"PUT / HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n", "not a number"),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "conflicting",
        ),
        (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
        (b"PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n", "larger than the limit"),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n", "more than 100 header"),
    ],
)
def test_refused_heads(raw: bytes, reason: str) -> None:
    events = read_all(raw)
    assert len(events) == 1
    assert isinstance(events[0], ProtocolError)
    assert reason in events[0].message


def test_endless_headers_are_refused_without_waiting_for_their_end() -> None:
    events = read_all(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEADER_BYTES)
    assert isinstance(events[0], ProtocolError)


def test_the_same_content_length_twice_is_fine() -> None:
    [request] = read_all(
        b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert isinstance(request, Request) and request.body == b"{}"


def test_a_reader_is_spent_after_an_error() -> None:
    reader = RequestReader()
    reader.feed(b"BAD\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert isinstance(reader.next_event(), ProtocolError)
    assert reader.next_event() is None


def test_encoded_responses() -> None:
    assert encode_response(204) == b"HTTP/1.1 204 No Content\r\nServer: Ember\r\n\r\n"
    ok = encode_response(200, b"{}", {"Deprecation": "true"}, close=True)
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 2\r\n" in ok
    assert b"Content-Type: application/json\r\n" in ok
    assert b"Connection: close\r\n" in ok
    assert ok.endswith(b"\r\n\r\n{}")


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    reader = RequestReader(max_payload=100)
    reader.feed(data)
    for _ in range(50):
        if reader.next_event() is None:
            break
