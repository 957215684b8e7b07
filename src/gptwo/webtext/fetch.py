"""Stage 2 — fetch the URL list politely and resumably.

Asynchronous HTTP (aiohttp) with a global and a per-host concurrency limit, timeouts, retries
with exponential backoff for timeouts / 429 / 5xx, redirects followed by hand (bounded, loops
detected), robots.txt honoured for every hop, a size cap and a content-type check, and only
globally routable addresses connected to (`addresses`: pages, redirects and robots.txt alike;
refused URLs are `blocked_address`, never retried). Outcomes go to
`CrawlState` (SQLite) as they finish, so an interrupted crawl resumes where it stopped. Optionally
every stored response is also written to WARC files (warcio).

The URLs are split into partitions by host; each partition is one task of the `CrawlPipeline`.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import random
import time
import urllib.robotparser
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from gptwo.errors import GptwoError
from gptwo.webtext.addresses import BlockedAddress, GuardedResolver, literal_host_allowed
from gptwo.webtext.crawlstate import CrawlState, PageResult, open_crawl_dir, partition_of
from gptwo.webtext.pipeline import CrawlPipeline
from gptwo.webtext.records import StageReport, read_jsonl, write_jsonl
from gptwo.webtext.urls import LONE_SURROGATE, SQLITE_INT_LIMIT, normalize_url, url_host

DEFAULT_USER_AGENT = "gptwo-webtext/0.1 (research crawler; honours robots.txt)"
HTML_TYPES = ("text/html", "application/xhtml+xml")
REDIRECT_CODES = (301, 302, 303, 307, 308)
RETRY_CODES = (429, 500, 502, 503, 504)
ROBOTS_OUTCOMES = {"disallowed": "robots_disallowed", "unreachable": "robots_unreachable", "blocked": "blocked_address"}


@dataclass(frozen=True)
class FetchOptions:
    """Crawl limits. `concurrency` is global (split over the worker processes), `per_host` per host.
    Only globally routable addresses are fetched unless `allow_private_addresses`; `resolve` pins
    names to addresses, used as given (like curl's --resolve), e.g. one intranet or staging host."""

    concurrency: int = 64
    per_host: int = 2
    timeout: float = 20.0
    retries: int = 2
    backoff: float = 1.0
    max_redirects: int = 5
    max_bytes: int = 5_000_000
    user_agent: str = DEFAULT_USER_AGENT
    warc: bool = False
    retry_failed: bool = False
    allow_private_addresses: bool = False
    resolve: tuple[tuple[str, str], ...] = ()

    def check(self) -> None:
        for name in ("concurrency", "per_host", "max_bytes"):
            if getattr(self, name) < 1:
                raise GptwoError(f"--{name.replace('_', '-')} must be at least 1", "pass a positive number")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or self.max_redirects < 0:
            raise GptwoError(
                "timeouts, retries, backoff and redirect limits can't be negative", "check the fetch options"
            )


class _Response:
    """What one HTTP exchange produced (the body only for HTML under the size cap)."""

    def __init__(self, status: int, reason: str, headers, body: bytes | None = None, problem: str | None = None):
        self.status, self.reason, self.headers, self.body, self.problem = status, reason, headers, body, problem


class Crawler:
    """Fetches one partition's URLs into its `CrawlState`."""

    def __init__(self, state: CrawlState, options: FetchOptions, concurrency: int, warc_path: Path | None = None):
        self.state, self.options = state, options
        self.concurrency = concurrency
        self.global_limit = asyncio.Semaphore(concurrency)
        self.host_limits: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(options.per_host))
        self.robots: dict[str, urllib.robotparser.RobotFileParser | bool | str | None] = {}
        self.robots_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.warc_path = warc_path
        self.warc_writer = None
        self.fetched = 0

    async def run(self, records: list[dict[str, Any]]) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.options.timeout)
        resolver = GuardedResolver(
            pinned=dict(self.options.resolve), allow_private=self.options.allow_private_addresses
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, resolver=resolver)
        headers = {"User-Agent": self.options.user_agent, "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1"}
        queue = deque(_interleave_hosts(records))
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as self.session:
                workers = [
                    asyncio.create_task(self._worker(queue)) for _ in range(min(len(queue), 2 * self.concurrency))
                ]
                await asyncio.gather(*workers)
        finally:
            if self.warc_writer is not None:
                self.warc_writer.out.close()

    async def _worker(self, queue: deque) -> None:
        while queue:
            meta = queue.popleft()
            result = await self.fetch_page(meta["url"])
            self.state.record(meta, result)
            self.fetched += 1

    async def fetch_page(self, url: str) -> PageResult:
        """Fetch `url`, following at most `max_redirects` redirects, each hop allowed by robots.txt."""
        seen, current = {url}, url
        for _ in range(self.options.max_redirects + 1):
            robots = await self.robots_verdict(current)
            if robots != "allowed":
                return PageResult(ROBOTS_OUTCOMES[robots], transient=robots == "unreachable", final_url=current)
            response = await self.request(current)
            if response.problem in ("timeout", "connection_error"):
                return PageResult(response.problem, transient=True, final_url=current)
            if response.problem == "blocked_address":
                return PageResult("blocked_address", final_url=current)
            if response.status in REDIRECT_CODES:
                target = normalize_url(urljoin(current, response.headers.get("Location", "")))
                if target is None:
                    return PageResult("bad_redirect", http_status=response.status, final_url=current)
                if target in seen:
                    return PageResult("redirect_loop", http_status=response.status, final_url=current)
                seen.add(target)
                current = target
                continue
            content_type = response.headers.get("Content-Type")
            if not 200 <= response.status < 300:
                return PageResult(
                    f"http_{response.status}",
                    transient=response.status in RETRY_CODES,
                    http_status=response.status,
                    final_url=current,
                )
            if response.problem:
                return PageResult(
                    response.problem, http_status=response.status, final_url=current, content_type=content_type
                )
            self._write_warc(current, response)
            return PageResult(
                "ok", http_status=response.status, final_url=current, content_type=content_type, body=response.body
            )
        return PageResult("too_many_redirects", final_url=current)

    async def request(self, url: str, page: bool = True) -> _Response:
        """One GET (no redirects followed), retried with exponential backoff on timeouts,
        connection errors, 429 and 5xx. `page=False` reads any body (robots.txt), truncated at the cap."""
        import aiohttp

        if not self.address_allowed(url):
            return _Response(0, "", {}, problem="blocked_address")
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            try:
                async with self.host_limits[url_host(url)], self.global_limit:
                    async with self.session.get(url, allow_redirects=False) as resp:
                        if resp.status in RETRY_CODES and attempt + 1 < attempts:
                            problem = "retry"
                        else:
                            return await (self._read(resp) if page else self._read_any(resp))
            except TimeoutError:
                problem = "timeout"
            except aiohttp.ClientConnectorError as err:
                if isinstance(err.os_error, BlockedAddress):  # the resolver refused every answer
                    return _Response(0, "", {}, problem="blocked_address")
                problem = "connection_error"
            except (aiohttp.ClientError, OSError, UnicodeError, ValueError):
                problem = "connection_error"
            if attempt + 1 < attempts:
                await asyncio.sleep(self.options.backoff * 2**attempt * (0.5 + random.random() / 2))
        return _Response(0, "", {}, problem=problem)

    async def _read(self, resp) -> _Response:
        """Read an HTML body up to the size cap; other bodies are not downloaded."""
        if not 200 <= resp.status < 300:
            return _Response(resp.status, resp.reason or "", resp.headers)
        declared = resp.headers.get("Content-Type")
        if declared is not None and declared.split(";")[0].strip().lower() not in HTML_TYPES:
            return _Response(resp.status, resp.reason or "", resp.headers, problem="not_html")
        if (resp.content_length or 0) > self.options.max_bytes:
            return _Response(resp.status, resp.reason or "", resp.headers, problem="too_large")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(65536):
            body += chunk
            if len(body) > self.options.max_bytes:
                return _Response(resp.status, resp.reason or "", resp.headers, problem="too_large")
        if declared is None and not _looks_like_html(bytes(body[:1024])):
            return _Response(resp.status, resp.reason or "", resp.headers, problem="not_html")
        return _Response(resp.status, resp.reason or "", resp.headers, body=bytes(body))

    async def _read_any(self, resp) -> _Response:
        body = await resp.content.read(self.options.max_bytes) if 200 <= resp.status < 300 else None
        return _Response(resp.status, resp.reason or "", resp.headers, body=body)

    def address_allowed(self, url: str) -> bool:
        """False for a URL whose host is an IP literal the guard refuses (checked before connecting;
        names are checked by the resolver on every lookup)."""
        if self.options.allow_private_addresses:
            return True
        host = url_host(url)
        return host.rstrip(".").lower() in dict(self.options.resolve) or literal_host_allowed(host) is not False

    async def robots_verdict(self, url: str) -> str:
        """What robots.txt of `url`'s origin says for our User-Agent: 'allowed', 'disallowed',
        'unreachable' (unreachable or 5xx: nothing may be fetched from that origin in this run, and
        the next run asks again) or 'blocked' (it is, or redirects to, an address the guard refuses).
        RFC 9309: a 4xx robots.txt allows everything."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        async with self.robots_locks[origin]:
            if origin not in self.robots:
                stored = self.state.robots(origin)
                if stored is None:
                    response = await self._get_robots(origin + "/robots.txt")
                    if response.problem == "blocked_address":
                        self.robots[origin] = "blocked"
                        return "blocked"
                    stored = (response.status or None, (response.body or b"").decode("utf-8", "replace"))
                    if stored[0] is not None and stored[0] < 500:
                        self.state.save_robots(origin, *stored)
                self.robots[origin] = _robots_rules(*stored)
        rules = self.robots[origin]
        if rules is None:
            return "unreachable"
        if isinstance(rules, str):
            return rules
        allowed = rules if isinstance(rules, bool) else rules.can_fetch(self.options.user_agent, url)
        return "allowed" if allowed else "disallowed"

    async def _get_robots(self, url: str) -> _Response:
        for _ in range(self.options.max_redirects + 1):
            response = await self.request(url, page=False)
            if response.problem == "blocked_address" or response.status not in REDIRECT_CODES:
                return response
            url = urljoin(url, response.headers.get("Location", ""))
        return _Response(0, "", {}, problem="too_many_redirects")

    def _write_warc(self, url: str, response: _Response) -> None:
        if self.warc_path is None:
            return
        from warcio.statusandheaders import StatusAndHeaders
        from warcio.warcwriter import WARCWriter

        if self.warc_writer is None:
            self.warc_path.parent.mkdir(parents=True, exist_ok=True)
            self.warc_writer = WARCWriter(open(self.warc_path, "ab"), gzip=True)
        headers = StatusAndHeaders(
            f"{response.status} {response.reason}", list(response.headers.items()), protocol="HTTP/1.1"
        )
        record = self.warc_writer.create_warc_record(
            url, "response", payload=io.BytesIO(response.body), http_headers=headers
        )
        self.warc_writer.write_record(record)


def _looks_like_html(head: bytes) -> bool:
    head = head.lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--")) or b"<html" in head


def _robots_rules(status: int | None, body: str) -> urllib.robotparser.RobotFileParser | bool | None:
    if status is None or status >= 500:
        return None
    if status >= 400:
        return True
    parser = urllib.robotparser.RobotFileParser()
    parser.parse(body.splitlines())
    return parser


def _interleave_hosts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order URLs round-robin over hosts, so a host with many URLs doesn't hold up the others."""
    by_host: dict[str, deque] = defaultdict(deque)
    for record in records:
        by_host[url_host(record["url"])].append(record)
    ordered, queues = [], deque(by_host.values())
    while queues:
        q = queues.popleft()
        ordered.append(q.popleft())
        if q:
            queues.append(q)
    return ordered


def _read_url_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a URL file, each checked: its fields go into SQLite as they are."""
    fix = "write it with 'gptwo webtext urls' (which also reads plain lists of URLs)"
    records = []
    for number, record in enumerate(read_jsonl(path, fix=fix), 1):
        problem = _url_record_problem(record)
        if problem:
            raise GptwoError(f"{path} is not a URL file: record {number} {problem}", fix)
        records.append(record)
    return records


def _url_record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with one record of a URL file (None if nothing): the fields are stored in SQLite."""
    url = record.get("url")
    if (
        not isinstance(url, str)
        or urlsplit(url).scheme not in ("http", "https")
        or not url_host(url)
        or LONE_SURROGATE.search(url)
    ):
        return "has no http(s) URL"
    score = record.get("score")
    if score is not None and (type(score) is not int or not -SQLITE_INT_LIMIT <= score < SQLITE_INT_LIMIT):
        return f"has a score that is not a 64-bit integer ({score!r:.40})"
    for key in ("title", "subreddit"):
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or LONE_SURROGATE.search(value)):
            return f"has a {key} that is not text"
    return None


def crawl_partition(
    db_path: str, urls_path: str, options: FetchOptions, concurrency: int, warc_path: str | None
) -> int:
    """Fetch the not-yet-finished URLs of one partition (runs in a worker); returns how many were fetched."""
    state = CrawlState(db_path)
    try:
        done = state.finished_urls(retry_transient=options.retry_failed, retry_blocked=options.allow_private_addresses)
        todo = [r for r in read_jsonl(urls_path) if r["url"] not in done]
        crawler = Crawler(state, options, concurrency, Path(warc_path) if warc_path else None)
        if todo:
            asyncio.run(crawler.run(todo))
        return crawler.fetched
    finally:
        state.close()


def fetch_urls(
    urls_file: str | os.PathLike,
    crawl_dir: str | os.PathLike,
    *,
    options: FetchOptions = FetchOptions(),
    partitions: int = 8,
    engine: CrawlPipeline | None = None,
) -> StageReport:
    """Stage 2: fetch every URL of `urls_file` into `crawl_dir`, resuming a previous run there.

    Returns the stage's counts over the whole crawl (this run and earlier ones).
    """
    options.check()
    if not Path(urls_file).is_file():
        raise GptwoError(f"URL file not found: {urls_file}", "run 'gptwo webtext urls' first, or check the path")
    engine = engine or CrawlPipeline()
    records = _read_url_file(urls_file)
    crawl_dir = Path(crawl_dir)
    partitions = open_crawl_dir(crawl_dir, partitions)
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(partitions)]
    for record in records:
        buckets[partition_of(url_host(record["url"]), partitions)].append(record)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tasks = []
    for i, bucket in enumerate(buckets):
        urls_path = crawl_dir / f"part-{i:05d}.urls.ndjson.zst"
        write_jsonl(urls_path, bucket)
        warc_path = str(crawl_dir / "warc" / f"part-{i:05d}-{run_id}.warc.gz") if options.warc else None
        tasks.append((str(crawl_dir / f"part-{i:05d}.sqlite"), str(urls_path), options, 0, warc_path))
    per_task = max(1, math.ceil(options.concurrency / min(engine.workers, partitions)))
    tasks = [(db, urls, opts, per_task, warc) for db, urls, opts, _, warc in tasks]
    fetched = sum(engine.map(crawl_partition, tasks))
    return crawl_report(crawl_dir, fetched_this_run=fetched)


def crawl_report(crawl_dir: str | os.PathLike, fetched_this_run: int | None = None) -> StageReport:
    """Counts of a crawl folder: URLs finished, pages stored, and the rest by reason."""
    from gptwo.webtext.crawlstate import partition_paths

    report = StageReport("fetch")
    for path in partition_paths(crawl_dir):
        if not path.exists():
            continue
        state = CrawlState(path)
        for status, n in state.status_counts().items():
            report.seen += n
            if status == "ok":
                report.kept += n
            else:
                report.dropped[status] += n
        state.close()
    if fetched_this_run is not None:
        report.notes["fetched_this_run"] = fetched_this_run
    return report
