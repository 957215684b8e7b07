"""The crawl's state on disk: one SQLite file per partition holding every finished URL, its
outcome, its (compressed) page, and each host's robots.txt.

A page and the fact that it was fetched are written in one transaction, so a crawl killed at any
moment resumes without fetching a stored page again and without losing one.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from gptwo.errors import GptwoError
from gptwo.webtext.records import read_json, write_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS pages(
    url TEXT PRIMARY KEY,      -- normalized URL from the URL stage
    status TEXT NOT NULL,      -- 'ok' or the reason the page was not stored
    transient INTEGER NOT NULL DEFAULT 0,  -- 1 if a later run may retry it (timeouts, 5xx)
    http_status INTEGER,
    final_url TEXT,
    content_type TEXT,
    body BLOB,                 -- zstd-compressed response body, 'ok' pages only
    subreddit TEXT, score INTEGER, title TEXT,
    fetched_at REAL
);
CREATE TABLE IF NOT EXISTS robots(
    origin TEXT PRIMARY KEY,   -- scheme://host[:port]
    status INTEGER,            -- HTTP status of /robots.txt, or NULL when unreachable
    body TEXT
);
"""

META_FILE = "crawl.json"
CRAWL_FORMAT = "gptwo-webtext-crawl"


def partition_of(host: str, partitions: int) -> int:
    """Stable partition of a host: all URLs of a host land in one partition, so per-host limits
    and robots.txt are enforced in one place."""
    digest = hashlib.blake2b(host.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def partition_paths(crawl_dir: str | Path) -> list[Path]:
    """The SQLite files of a crawl folder, in partition order."""
    crawl_dir = Path(crawl_dir)
    meta = crawl_dir / META_FILE
    if not meta.is_file():
        raise GptwoError(f"{crawl_dir} is not a crawl folder (no {META_FILE})", "run 'gptwo webtext fetch' first")
    return [crawl_dir / f"part-{i:05d}.sqlite" for i in range(_partitions(meta))]


def _partitions(meta: Path) -> int:
    """The partition count recorded in `crawl.json`; a damaged file is an error naming the way out."""
    try:
        data = read_json(meta)
        partitions = data["partitions"]
        valid = data.get("format") == CRAWL_FORMAT and type(partitions) is int and partitions >= 1
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        valid = False
    if not valid:
        found = len(list(meta.parent.glob("part-*.sqlite")))
        raise GptwoError(
            f"{meta} is damaged: it should hold the crawl's partition count",
            f'restore it from a backup, or write {{"format": "{CRAWL_FORMAT}", "version": 1, "partitions": N}} '
            f"into it with N the --partitions of the first run ({found} part-*.sqlite files are there), "
            f"or delete {meta.parent} to crawl again",
        )
    return partitions


def open_crawl_dir(crawl_dir: str | Path, partitions: int) -> int:
    """Create or reopen a crawl folder; the partition count is fixed by its first run."""
    crawl_dir = Path(crawl_dir)
    if crawl_dir.exists() and not crawl_dir.is_dir():
        raise GptwoError(f"{crawl_dir} is a file, not a crawl folder", "choose another --out folder")
    crawl_dir.mkdir(parents=True, exist_ok=True)
    meta = crawl_dir / META_FILE
    if meta.is_file():
        return _partitions(meta)
    if partitions < 1:
        raise GptwoError(f"--partitions must be at least 1 (got {partitions})", "pass a positive number")
    write_json(meta, {"format": CRAWL_FORMAT, "version": 1, "partitions": partitions})
    return partitions


@dataclass
class PageResult:
    """The outcome of fetching one URL."""

    status: str
    transient: bool = False
    http_status: int | None = None
    final_url: str | None = None
    content_type: str | None = None
    body: bytes | None = None


class CrawlState:
    """One partition's SQLite file. SQLite's errors (a damaged or locked file) come out as a
    `GptwoError` naming the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        with self._named_errors():
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; fsync per checkpoint
            self.db.executescript(SCHEMA)
        self._compress = zstandard.ZstdCompressor(level=3)

    @contextmanager
    def _named_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as err:
            if "locked" not in str(err):
                raise self._damaged(err) from None
            raise GptwoError(
                f"crawl database {self.path} is locked ({err})",
                "another crawl is writing this folder: wait for it to finish or stop it",
            ) from None
        except (sqlite3.Error, zstandard.ZstdError) as err:
            raise self._damaged(err) from None

    def _damaged(self, err: Exception) -> GptwoError:
        self.db.close()
        return GptwoError(
            f"crawl database {self.path} is damaged ({err})",
            f"restore it from a backup, or delete {self.path.name} and its -wal/-shm files "
            "(the next fetch downloads that partition's pages again)",
        )

    def finished_urls(self, retry_transient: bool = False, retry_blocked: bool = False) -> set[str]:
        """URLs that need no fetch: every finished one, less the transient failures with
        `retry_transient` and the refused private addresses with `retry_blocked` (the guard is off)."""
        conditions = (["transient = 0"] if retry_transient else []) + (
            ["status != 'blocked_address'"] if retry_blocked else []
        )
        query = "SELECT url FROM pages" + (" WHERE " + " AND ".join(conditions) if conditions else "")
        with self._named_errors():
            return {row[0] for row in self.db.execute(query)}

    def record(self, meta: dict[str, Any], result: PageResult) -> None:
        """Store one URL's outcome (and page) in a single committed transaction."""
        body = self._compress.compress(result.body) if result.body is not None else None
        with self._named_errors():
            self.db.execute(
                "INSERT OR REPLACE INTO pages VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    meta["url"],
                    result.status,
                    int(result.transient),
                    result.http_status,
                    result.final_url,
                    result.content_type,
                    body,
                    meta.get("subreddit"),
                    meta.get("score"),
                    meta.get("title"),
                    time.time(),
                ),
            )

    def robots(self, origin: str) -> tuple[int | None, str] | None:
        with self._named_errors():
            row = self.db.execute("SELECT status, body FROM robots WHERE origin = ?", (origin,)).fetchone()
        return None if row is None else (row[0], row[1])

    def save_robots(self, origin: str, status: int | None, body: str) -> None:
        with self._named_errors():
            self.db.execute("INSERT OR REPLACE INTO robots VALUES (?,?,?)", (origin, status, body))

    def status_counts(self) -> dict[str, int]:
        with self._named_errors():
            return dict(self.db.execute("SELECT status, count(*) FROM pages GROUP BY status"))

    def pages(self) -> Iterator[dict[str, Any]]:
        """Stored pages ('ok') in URL order, bodies decompressed."""
        decompress = zstandard.ZstdDecompressor()
        with self._named_errors():
            rows = self.db.execute(
                "SELECT url, final_url, content_type, body, subreddit, score, title "
                "FROM pages WHERE status = 'ok' ORDER BY url"
            )
            for url, final_url, content_type, body, subreddit, score, title in rows:
                yield {
                    "url": url,
                    "final_url": final_url,
                    "content_type": content_type,
                    "body": decompress.decompress(body),
                    "subreddit": subreddit,
                    "score": score,
                    "title": title,
                }

    def count_ok(self) -> int:
        with self._named_errors():
            return self.db.execute("SELECT count(*) FROM pages WHERE status = 'ok'").fetchone()[0]

    def close(self) -> None:
        self.db.close()
