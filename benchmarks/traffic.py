"""Bounded concurrent load on 127.0.0.1 for the reliability tier and benchmarks: every loop
is bounded in count and in time, and every answer is kept with when it came."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from servegraph.security.client import client_headers


@dataclass
class Answer:
    status: int  # 0: no answer (the client gave up)
    seconds: float
    headers: httpx.Headers | None
    body: Any
    # From the moment this request was written to its socket (`raw_burst` only): a
    # burst's requests are all started at once, but one client process connects and
    # writes them one after another, so `seconds` includes that client's own delay.
    since_written: float | None = None


async def burst(
    base_url: str,
    path: str,
    bodies: list[dict],
    *,
    headers: dict[str, str] | None = None,
    client_timeout_s: float = 60,
) -> list[Answer]:
    """Send every body at once, each on its own connection; the answers, in order."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=client_timeout_s, limits=limits
    ) as client:

        async def one(body: dict) -> Answer:
            started = time.monotonic()
            try:
                response = await client.post(path, json=body, headers=headers)
            except httpx.HTTPError:
                return Answer(0, time.monotonic() - started, None, None)
            try:
                payload = response.json()
            except ValueError:
                payload = response.text
            return Answer(
                response.status_code, time.monotonic() - started, response.headers, payload
            )

        return list(await asyncio.gather(*(one(body) for body in bodies)))


async def raw_burst(
    base_url: str,
    path: str,
    bodies: list[dict],
    *,
    headers: dict[str, str] | None = None,
    client_timeout_s: float = 60,
) -> tuple[list[Answer], float]:
    """`burst`, from a load generator that is not the limit: each request written as
    bytes on its own non-blocking socket and its answer read to the end of the
    connection, by one thread with a selector, with no HTTP library in between. (httpx
    spends milliseconds of CPU per request, and even asyncio's streams a few hundred
    microseconds: at 1,200 at once on a 2-core machine the client then takes a core
    for most of a second and writes its last requests late.) Returns the answers, in
    order, and the CPU seconds this process spent."""
    import json as json_module
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = {"host": f"{host}:{port}", "content-type": "application/json"}
    head |= client_headers() | {k.lower(): v for k, v in (headers or {}).items()}
    head["connection"] = "close"

    def request(body: dict) -> bytes:
        payload = json_module.dumps(body).encode()
        lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items())]
        lines.append(f"content-length: {len(payload)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    def answer(started: float, sent: _Sent) -> Answer:
        if sent.done is None or sent.written is None or not sent.raw:
            return Answer(0, (sent.done or time.monotonic()) - started, None, None)
        top, _, text = sent.raw.partition(b"\r\n\r\n")
        status_line, *header_lines = top.decode("latin-1").split("\r\n")
        parsed = httpx.Headers([tuple(x.split(": ", 1)) for x in header_lines if ": " in x])
        if parsed.get("transfer-encoding") == "chunked":
            text = _unchunk(text)
        try:
            body: Any = json_module.loads(text)
        except ValueError:
            body = text.decode("utf-8", "replace")
        status = int(status_line.split(" ", 2)[1])
        seconds, since_written = sent.done - started, sent.done - sent.written
        return Answer(status, seconds, parsed, body, since_written=since_written)

    datas = [request(b) for b in bodies]
    cpu, started = time.process_time(), time.monotonic()
    # A thread: the caller's event loop stays free (a test's server may run on it).
    sent = await asyncio.to_thread(_fire, (host, port), datas, client_timeout_s)
    return [answer(started, s) for s in sent], time.process_time() - cpu


@dataclass
class _Sent:
    data: bytes
    written: float | None = None  # when its last byte was written
    done: float | None = None  # when the server closed the connection (or it failed)
    raw: bytes = b""


def _fire(address: tuple[str, int], datas: list[bytes], timeout_s: float) -> list[_Sent]:
    """Connects once per request at once, writes each as soon as its connection is up,
    and reads each answer until the server closes; every socket non-blocking, one
    selector. A connection that fails, or is still open after `timeout_s`, ends with
    no answer."""
    import errno
    import selectors
    import socket

    sent = [_Sent(d) for d in datas]
    chunks: dict[int, list[bytes]] = {}
    with selectors.DefaultSelector() as selector:

        def end(sock: socket.socket, one: _Sent, raw: bytes) -> None:
            one.raw, one.done = raw, time.monotonic()
            selector.unregister(sock)
            sock.close()

        try:
            for i, one in enumerate(sent):
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError:  # out of file descriptors: this one gets no answer
                    one.done = time.monotonic()
                    continue
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_WRITE, i)
                if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                    end(sock, one, b"")  # refused at once: no answer
            deadline = time.monotonic() + timeout_s
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    sock, i = key.fileobj, key.data
                    assert isinstance(sock, socket.socket)
                    one = sent[i]
                    try:
                        if one.written is None:
                            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                                raise ConnectionError("connect failed")
                            one.data = one.data[sock.send(one.data) :]
                            if not one.data:
                                one.written = time.monotonic()
                                selector.modify(sock, selectors.EVENT_READ, i)
                            continue
                        chunk = sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue  # not ready after all: the selector asks again
                    except OSError:
                        end(sock, one, b"")
                        continue
                    if chunk:
                        chunks.setdefault(i, []).append(chunk)
                    else:
                        end(sock, one, b"".join(chunks.pop(i, [])))
        finally:  # past the timeout, or failed: no answer, and no socket left open
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    return sent


def _unchunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2 :]
    return out


async def callers(
    base_url: str,
    path: str,
    body_for: Any,
    *,
    n: int,
    stop: asyncio.Event,
    max_requests: int,
    max_seconds: float,
    headers: dict[str, str] | None = None,
    answers: list[Answer] | None = None,
    max_per_caller: int | None = None,
) -> list[Answer]:
    """`n` closed-loop callers, each sending `body_for(caller, i)` until `stop` is set,
    `max_requests` were sent in all (or `max_per_caller` by this caller), or `max_seconds`
    passed. The answers are appended
    to `answers` (when given) as they come, and returned."""
    answers = [] if answers is None else answers
    deadline = time.monotonic() + max_seconds
    sent = 0
    async with httpx.AsyncClient(
        headers=client_headers(), base_url=base_url, timeout=120
    ) as client:

        async def caller(c: int) -> None:
            nonlocal sent
            i = 0
            while not stop.is_set() and sent < max_requests:
                if max_per_caller is not None and i >= max_per_caller:
                    return
                if time.monotonic() > deadline:
                    return
                sent += 1
                started = time.monotonic()
                try:
                    response = await client.post(path, json=body_for(c, i), headers=headers)
                    try:
                        payload = response.json()
                    except ValueError:
                        payload = response.text
                    answers.append(
                        Answer(
                            response.status_code,
                            time.monotonic() - started,
                            response.headers,
                            payload,
                        )
                    )
                except httpx.HTTPError:
                    answers.append(Answer(0, time.monotonic() - started, None, None))
                i += 1

        await asyncio.gather(*(caller(c) for c in range(n)))
    return answers


def one_document(run: str, fact: str) -> Any:
    """`body_for` of `callers` on /pipelines/rag_ingest: one document per request, with
    the id `<run>/c<caller>/d<i>` (so what was acknowledged can be counted afterwards)
    and the metadata `{"run": run}`."""

    def body(c: int, i: int) -> dict:
        document = {"id": f"{run}/c{c}/d{i}", "text": f"Note {i} of caller {c}: {fact}"}
        return {"documents": [document | {"metadata": {"run": run}}]}

    return body


def replica_pids(dashboard_url: str, app: str, deployment: str) -> list[int]:
    """PIDs of the live replicas of `app`'s `deployment`, from Ray's state API at this
    cluster's dashboard (named, since other Ray clusters may run on the machine)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=dashboard_url,
        filters=[
            ("class_name", "=", f"ServeReplica:{app}:{deployment}"),
            ("state", "=", "ALIVE"),
        ],
    )
    return [int(a.pid) for a in actors]


async def until(condition: Any, timeout_s: float, what: str) -> None:
    """Wait, bounded, for `condition()` (run off the event loop); TimeoutError naming
    `what` when it does not hold in time."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


def proxy_gating(base_url: str, timeout_s: float = 30) -> None:
    """Wait, bounded, until the proxy at `base_url` has read the ingress's admission
    limits (`servegraph.serving.proxy_answers.FrontDoor`, `GET /-/admission`): a burst
    sent sooner after a deploy is not yet refused at the proxy."""

    def gating() -> bool:
        try:
            return bool(httpx.get(f"{base_url}/-/admission", timeout=10).json()["gating"])
        except (httpx.HTTPError, ValueError, KeyError):  # not up yet: ask again
            return False

    asyncio.run(until(gating, timeout_s, "the proxy never read the admission limits"))


@dataclass
class KillRun:
    answers: list[Answer]
    replica_back_after_s: float


def kill_under_load(
    base_url: str,
    path: str,
    body_for: Any,
    *,
    replicas: Any,
    n: int,
    before: int,
    after: int,
    headers: dict[str, str] | None = None,
    max_requests: int = 20_000,
    max_seconds: float = 300,
) -> KillRun:
    """`n` callers on `path`; once `before` answers are 200, SIGKILL the only replica
    `replicas()` lists (the PIDs of a deployment's live replicas, e.g. `replica_pids`);
    keep the load on until a new replica is up and `after` more are 200."""
    import os
    import signal

    answers: list[Answer] = []
    stop = asyncio.Event()

    def ok() -> int:
        return sum(a.status == 200 for a in answers)

    async def run() -> float:
        load = asyncio.ensure_future(
            callers(
                base_url,
                path,
                body_for,
                n=n,
                stop=stop,
                max_requests=max_requests,
                max_seconds=max_seconds,
                headers=headers,
                answers=answers,
            )
        )
        try:
            await until(lambda: ok() >= before, 120, "no progress before the kill")
            (victim,) = replicas()
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            await until(lambda: bool(set(replicas()) - {victim}), 180, "no new replica")
            back = time.monotonic() - killed
            base = ok()
            await until(lambda: ok() >= base + after, 180, "no recovery after the restart")
            return back
        finally:
            stop.set()
            await load

    back = asyncio.run(run())
    return KillRun(answers, back)


# Every process of a platform started for a kill test carries this variable (its
# children inherit it), so a kill reaches that platform's processes and nothing else.
TAG = "SERVEGRAPH_CHAOS_TAG"


def tagged(tag: str) -> list[Any]:
    """The live processes whose environment carries `TAG=tag` (psutil processes)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_all(tag: str) -> int:
    """SIGKILL every process of the tagged tree, until none is left; how many."""
    import signal

    import psutil

    killed = 0
    for _ in range(50):  # bounded: a process forked while killing is caught next round
        procs = tagged(tag)
        if not procs:
            return killed
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)
    raise RuntimeError(f"processes tagged {tag} survive SIGKILL")
