"""Work before the key (issue 24, finding 3), through Serve's proxy on the shared
cluster: a caller without a key who announces a large body and trickles it is answered
401 before it has sent it; more such callers than `rag` has admission places (128)
leave `rag` open to a keyed caller; and a keyed body past its route's limit is a 413
from its Content-Length alone.

Raw sockets, because an HTTP client sends the whole body before it reads the answer:
here the body is never finished, and the answer must come anyway. Every socket read is
bounded by a timeout; nothing sleeps."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers

pytestmark = pytest.mark.reliability

ANNOUNCED = 10_000_000  # bytes each slow caller says it will send
SLOW_CALLERS = 200  # the 200; more than rag's max_in_flight (128)
QUESTION = {"question": "How long do refunds take after a return?"}


@contextmanager
def slow_body(
    base_url: str, path: str, headers: dict[str, str] | None = None
) -> Iterator[socket.socket]:
    """A POST whose head announces `ANNOUNCED` bytes and whose body stops after its
    first few: the connection stays open, the rest never comes."""
    url = httpx.URL(base_url)
    sock = socket.create_connection((url.host, url.port), timeout=60)
    try:
        lines = [
            f"POST {path} HTTP/1.1",
            f"host: {url.host}:{url.port}",
            "content-type: application/json",
            f"content-length: {ANNOUNCED}",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"question": "')
        yield sock
    finally:
        sock.close()


def answer_head(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """The status and headers the server answered (the socket's timeout bounds the
    wait: an answer that needs the rest of the body never comes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split(" ", 2)[1]), {k.lower(): v for k, v in headers.items()}


@pytest.mark.parametrize("path", ["/pipelines/rag", "/pipelines/rag_ingest", "/index/add"])
def test_without_a_key_a_slow_large_body_is_answered_before_it_is_sent(
    pipelines: LocalCluster, path: str
) -> None:
    with slow_body(pipelines.base_url, path) as sock:
        status, headers = answer_head(sock)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path


def test_callers_without_a_key_hold_none_of_a_pipelines_places(pipelines: LocalCluster) -> None:
    with ExitStack() as opened:
        sockets = [
            opened.enter_context(slow_body(pipelines.base_url, "/pipelines/rag"))
            for _ in range(SLOW_CALLERS)
        ]
        statuses = [answer_head(sock)[0] for sock in sockets]
        assert set(statuses) == {401}, statuses
        # Their connections still open, a keyed caller is admitted and answered.
        with httpx.Client(
            headers=client_headers(), base_url=pipelines.base_url, timeout=180
        ) as client:
            answer = client.post("/pipelines/rag", json=QUESTION)
        assert answer.status_code == 200, answer.text


def test_a_keyed_body_past_its_routes_limit_is_a_413(pipelines: LocalCluster) -> None:
    # Announced: refused from the Content-Length, before the body is sent.
    with slow_body(pipelines.base_url, "/pipelines/rag", client_headers()) as sock:
        status, _ = answer_head(sock)
    assert status == 413

    # Chunked (no Content-Length): refused once it passes the default 1 MiB. Sent from
    # a thread: the server stops reading at the limit, so the sender may block on a
    # full socket until the socket is closed, while this thread reads the answer.
    url = httpx.URL(pipelines.base_url)
    with socket.create_connection((url.host, url.port), timeout=60) as sock:
        head = [
            "POST /pipelines/rag HTTP/1.1",
            f"host: {url.host}:{url.port}",
            "content-type: application/json",
            "transfer-encoding: chunked",
            *(f"{name}: {value}" for name, value in client_headers().items()),
        ]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

        def send_chunks() -> None:
            piece = b"x" * 65536
            try:
                sock.sendall(b'%x\r\n{"question": "\r\n' % len(b'{"question": "'))
                for _ in range(24):  # 1.5 MiB, never finished
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:
                pass  # the server answered and closed: what is checked below

        sender = threading.Thread(target=send_chunks, daemon=True)
        sender.start()
        status, headers = answer_head(sock)
    sender.join(timeout=60)
    assert status == 413, headers
