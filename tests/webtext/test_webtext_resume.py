"""A crawl killed with SIGKILL resumes: no stored page is fetched again, none is lost or duplicated."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

from webtext_site import ENGLISH, article_html, words_text

from gptwo.webtext.extract import extract_documents
from gptwo.webtext.fetch import FetchOptions, fetch_urls
from gptwo.webtext.records import read_jsonl, write_jsonl

N_PAGES, SERVED_BEFORE_KILL = 30, 12


def stored_pages(db_path) -> int:
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM pages").fetchone()[0]
    except sqlite3.OperationalError:  # the crawler is still creating the file
        return 0


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the crawler"
        time.sleep(0.05)


def test_sigkilled_crawl_resumes_without_refetching_or_losing_pages(tmp_path, site_server):
    paths = [f"/gen/{i}" for i in range(N_PAGES)]
    for i, path in enumerate(paths):
        site_server.site.html(path, article_html(f"Generated {i}", words_text(ENGLISH, 300, seed=1000 + i)))
    urls = tmp_path / "urls.jsonl.zst"
    write_jsonl(urls, [{"url": site_server.url(p), "subreddit": "test", "score": 3, "title": p} for p in paths])
    crawl = tmp_path / "crawl"
    db_path = crawl / "part-00000.sqlite"

    # The server answers SERVED_BEFORE_KILL pages, then holds every further request unanswered.
    site_server.hold_after(SERVED_BEFORE_KILL)
    crawler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptwo.cli",
            "webtext",
            "fetch",
            str(urls),
            "--out",
            str(crawl),
            "--partitions",
            "1",
            "--workers",
            "1",
            "--allow-private-addresses",
            "--concurrency",
            "4",
            "--per-host",
            "4",
            "--timeout",
            "60",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: site_server.held > 0 and stored_pages(db_path) == SERVED_BEFORE_KILL)
    finally:
        os.kill(crawler.pid, signal.SIGKILL)
        crawler.wait()
    assert crawler.returncode == -signal.SIGKILL
    assert site_server.pages_served() == SERVED_BEFORE_KILL == stored_pages(db_path)

    site_server.release()
    report = fetch_urls(
        urls, crawl, options=FetchOptions(concurrency=4, per_host=4, timeout=10, allow_private_addresses=True)
    )
    assert report.notes["fetched_this_run"] == N_PAGES - SERVED_BEFORE_KILL
    assert report.kept == N_PAGES
    assert {p: site_server.served[p] for p in paths} == {p: 1 for p in paths}  # each page served exactly once
    assert site_server.served["/robots.txt"] == 1  # robots.txt is part of the saved state

    extract, dedup = extract_documents(crawl, tmp_path / "documents.jsonl.zst")
    docs = list(read_jsonl(tmp_path / "documents.jsonl.zst"))
    assert sorted(d["url"] for d in docs) == sorted(site_server.url(p) for p in paths)
    assert extract.kept == dedup.kept == N_PAGES
