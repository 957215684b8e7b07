"""Stage 2: the crawler against a generated site on 127.0.0.1."""

import sqlite3

import pytest

from gptwo.errors import GptwoError
from gptwo.webtext.crawlstate import partition_paths
from gptwo.webtext.fetch import FetchOptions, fetch_urls
from gptwo.webtext.records import write_jsonl

# The test site is on 127.0.0.1, which the crawler refuses unless told otherwise.
FAST = FetchOptions(
    concurrency=8, per_host=2, timeout=0.5, retries=1, backoff=0.01, max_bytes=1_000_000, allow_private_addresses=True
)

EXPECTED = {
    "/article/0": "ok",
    "/article/1": "ok",
    "/dup/exact": "ok",
    "/foreign/de": "ok",
    "/malformed": "ok",
    "/untyped": "ok",  # no Content-Type header, but the body is HTML
    "/flaky": "ok",  # one 503, then fine on the retry
    "/moved": "ok",  # 301 to /article/5
    "/missing": "http_404",
    "/error": "http_500",
    "/slow": "timeout",
    "/loop/a": "redirect_loop",
    "/binary": "not_html",
    "/photo": "not_html",
    "/huge": "too_large",
    "/huge-unsized": "too_large",
    "/private/secret": "robots_disallowed",
}


def write_urls(path, server, paths):
    write_jsonl(path, [{"url": server.url(p), "subreddit": "test", "score": 5, "title": p} for p in paths])
    return path


def crawl_rows(crawl_dir):
    rows = {}
    for db in partition_paths(crawl_dir):
        if db.exists():
            for url, status, transient, final_url, body in sqlite3.connect(db).execute(
                "SELECT url, status, transient, final_url, body IS NOT NULL FROM pages"
            ):
                rows[url] = (status, transient, final_url, body)
    return rows


def test_crawl_outcomes_politeness_and_resume(tmp_path, site_server):
    urls = write_urls(tmp_path / "urls.jsonl.zst", site_server, EXPECTED)
    report = fetch_urls(urls, tmp_path / "crawl", options=FAST, partitions=2)

    rows = crawl_rows(tmp_path / "crawl")
    assert {url.removeprefix(site_server.base): row[0] for url, row in rows.items()} == EXPECTED
    assert all(row[3] == (row[0] == "ok") for row in rows.values())  # bodies stored for 'ok' pages only
    assert rows[site_server.url("/moved")][2] == site_server.url("/article/5")
    assert rows[site_server.url("/error")][1] == 1 and rows[site_server.url("/missing")][1] == 0
    assert report.kept == 8 and report.seen == len(EXPECTED) and report.notes["fetched_this_run"] == len(EXPECTED)
    assert report.dropped == {
        "http_404": 1,
        "http_500": 1,
        "timeout": 1,
        "redirect_loop": 1,
        "not_html": 2,
        "too_large": 2,
        "robots_disallowed": 1,
    }

    requests = site_server.requests
    assert "/private/secret" not in requests  # robots.txt honoured
    assert requests["/robots.txt"] == 1
    assert requests["/flaky"] == 2 and requests["/error"] == 2 and requests["/slow"] == 2  # one retry each
    assert requests["/loop/a"] == 1 and requests["/loop/b"] == 1
    assert site_server.max_in_flight <= FAST.per_host
    assert site_server.user_agents == {FAST.user_agent}

    # A rerun fetches nothing, robots.txt included; --retry-failed retries only the transient failures.
    before = site_server.requests.copy()
    again = fetch_urls(urls, tmp_path / "crawl", options=FAST, partitions=5)  # partitions fixed by the first run
    assert site_server.requests == before and again.notes["fetched_this_run"] == 0 and again.kept == 8
    retry = fetch_urls(urls, tmp_path / "crawl", options=FetchOptions(**{**FAST.__dict__, "retry_failed": True}))
    assert retry.notes["fetched_this_run"] == 2
    assert +(site_server.requests - before) == {"/error": 2, "/slow": 2}


def test_per_host_limit_holds_under_high_global_concurrency(tmp_path, site_server):
    urls = write_urls(tmp_path / "urls.jsonl.zst", site_server, [f"/article/{i}" for i in range(6)] + ["/dup/near"])
    fetch_urls(
        urls,
        tmp_path / "crawl",
        options=FetchOptions(concurrency=32, per_host=1, timeout=5, allow_private_addresses=True),
    )
    assert site_server.max_in_flight == 1
    assert all(site_server.requests[f"/article/{i}"] == 1 for i in range(6))


def test_unreachable_robots_txt_blocks_the_origin_until_a_retry(tmp_path, site_server):
    site = site_server.site
    working_robots = site.pages["/robots.txt"]
    site.pages["/robots.txt"] = (503, {"Content-Type": "text/plain"}, b"busy")
    urls = write_urls(tmp_path / "urls.jsonl.zst", site_server, ["/article/0", "/article/1"])
    report = fetch_urls(urls, tmp_path / "crawl", options=FAST)
    assert report.dropped == {"robots_unreachable": 2} and "/article/0" not in site_server.requests

    site.pages["/robots.txt"] = working_robots
    report = fetch_urls(urls, tmp_path / "crawl", options=FetchOptions(**{**FAST.__dict__, "retry_failed": True}))
    assert report.kept == 2 and site_server.requests["/article/0"] == 1


def test_warc_output_holds_every_stored_response(tmp_path, site_server):
    from warcio.archiveiterator import ArchiveIterator

    paths = ["/article/2", "/article/3", "/missing"]
    urls = write_urls(tmp_path / "urls.jsonl.zst", site_server, paths)
    fetch_urls(urls, tmp_path / "crawl", options=FetchOptions(**{**FAST.__dict__, "warc": True}), partitions=1)
    warcs = list((tmp_path / "crawl" / "warc").glob("*.warc.gz"))
    assert len(warcs) == 1
    with open(warcs[0], "rb") as stream:
        records = {
            r.rec_headers.get_header("WARC-Target-URI"): r.content_stream().read()
            for r in ArchiveIterator(stream)
            if r.rec_type == "response"
        }
    assert records == {site_server.url(p): site_server.site.pages[p][2] for p in paths[:2]}


def test_bad_options_are_user_errors(tmp_path, site_server):
    urls = write_urls(tmp_path / "urls.jsonl.zst", site_server, ["/article/0"])
    with pytest.raises(GptwoError, match="per-host"):
        fetch_urls(urls, tmp_path / "crawl", options=FetchOptions(per_host=0))
    with pytest.raises(GptwoError, match="not found"):
        fetch_urls(tmp_path / "missing.jsonl.zst", tmp_path / "crawl")
