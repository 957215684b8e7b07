"""The crawler refuses addresses that are not globally routable: literal IPs in any spelling, names
that resolve to them, redirects and robots.txt redirects to them — and makes no request there."""

import asyncio
import json
import sqlite3

import pytest
from webtext_site import Site, SiteServer, submission, write_dump

from gptwo.cli import main
from gptwo.webtext.addresses import BlockedAddress, GuardedResolver, is_public_address, literal_host_allowed, parse_pin
from gptwo.webtext.crawlstate import partition_paths
from gptwo.webtext.fetch import FetchOptions, fetch_urls
from gptwo.webtext.records import write_jsonl

FAST = FetchOptions(concurrency=8, per_host=2, timeout=2, retries=1, backoff=0.01)
FAST_FLAGS = ["--timeout", "2", "--retries", "1", "--backoff", "0.01", "--workers", "1", "--partitions", "2"]

ADDRESSES = [
    # IPv4 private, loopback, link-local (cloud metadata), CGNAT, unspecified, multicast, broadcast
    ("10.1.2.3", False),
    ("172.16.0.1", False),
    ("172.31.255.254", False),
    ("192.168.1.1", False),
    ("127.0.0.1", False),
    ("127.200.0.9", False),
    ("169.254.169.254", False),
    ("100.64.0.1", False),
    ("0.0.0.0", False),
    ("224.0.0.1", False),
    ("255.255.255.255", False),
    ("192.0.2.7", False),
    # IPv6 loopback, unspecified, link-local (with a zone), unique local, site-local, multicast, documentation
    ("::1", False),
    ("::", False),
    ("fe80::1", False),
    ("fe80::1%eth0", False),
    ("fc00::1", False),
    ("fd12:3456::1", False),
    ("fec0::1", False),
    ("ff02::1", False),
    ("2001:db8::1", False),
    # IPv6 forms that carry a private IPv4: mapped, compatible, NAT64, 6to4, Teredo
    ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False),
    ("::ffff:169.254.169.254", False),
    ("::127.0.0.1", False),
    ("64:ff9b::7f00:1", False),
    ("64:ff9b::a00:1", False),
    ("64:ff9b:1::808:808", False),
    ("2002:7f00:1::", False),
    ("2002:a00:1::5", False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ("not an address", False),
    # globally routable
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("172.32.0.1", True),
    ("100.128.0.1", True),
    ("2001:4860:4860::8888", True),
    ("::ffff:8.8.8.8", True),
    ("64:ff9b::808:808", True),
    ("2002:808:808::1", True),
]


@pytest.mark.parametrize("address, public", ADDRESSES, ids=[a for a, _ in ADDRESSES])
def test_address_classifier(address, public):
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    "host, verdict",
    [
        ("127.0.0.1", False),
        ("127.1", False),
        ("0x7f.0.0.1", False),
        ("0177.0.0.1", False),
        ("2130706433", False),
        ("::ffff:127.0.0.1", False),
        ("127.0.0.1.", False),
        ("1.2.3.4.5", False),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("news.example.com", None),
        ("localhost", None),
    ],
)
def test_literal_hosts_in_every_spelling(host, verdict):
    assert literal_host_allowed(host) is verdict


class ScriptedDns:
    """Stands in for DNS: answers each lookup with the next list of addresses."""

    def __init__(self, *answers):
        self.answers, self.lookups = list(answers), 0

    async def resolve(self, host, port=0, family=0):
        self.lookups += 1
        return [
            {"hostname": host, "host": a, "port": port, "family": 0, "proto": 0, "flags": 0}
            for a in self.answers.pop(0)
        ]

    async def close(self):
        pass


def test_resolver_checks_every_answer_so_a_rebinding_name_is_refused():
    async def lookups():
        dns = ScriptedDns(["8.8.8.8"], ["127.0.0.1"], ["10.0.0.1", "1.1.1.1", "::1"])
        guard = GuardedResolver(inner=dns, pinned={"intranet.example.com": "10.0.0.7"})
        first = [a["host"] for a in await guard.resolve("rebind.example.com", 80)]
        with pytest.raises(BlockedAddress) as blocked:
            await guard.resolve("rebind.example.com", 80)  # the same name, now answering loopback
        mixed = [a["host"] for a in await guard.resolve("mixed.example.com", 80)]
        pinned = [a["host"] for a in await guard.resolve("Intranet.Example.com.", 80)]
        return first, blocked.value, mixed, pinned, dns.lookups

    first, blocked, mixed, pinned, dns_lookups = asyncio.run(lookups())
    assert first == ["8.8.8.8"] and blocked.addresses == ["127.0.0.1"]
    assert mixed == ["1.1.1.1"]  # private answers dropped, the public one kept
    assert pinned == ["10.0.0.7"] and dns_lookups == 3  # a pinned name is not looked up


def test_parse_pin():
    assert parse_pin("News.Example.com.=127.0.0.1") == ("news.example.com", "127.0.0.1")
    assert parse_pin("v6.example.com=[::1]") == ("v6.example.com", "::1")
    for bad in ("news.example.com", "=127.0.0.1", "127.0.0.1=127.0.0.2", "news.example.com=nowhere"):
        with pytest.raises(ValueError):
            parse_pin(bad)


def crawl_rows(crawl_dir):
    rows = {}
    for db in partition_paths(crawl_dir):
        if db.exists():
            rows.update(
                {
                    url: (status, final_url)
                    for url, status, final_url in sqlite3.connect(db).execute(
                        "SELECT url, status, final_url FROM pages"
                    )
                }
            )
    return rows


def test_build_refuses_links_to_its_own_loopback_server_without_one_request(tmp_path, site_server, capsys):
    port = site_server.httpd.server_port
    links = [
        site_server.url("/article/0"),
        f"http://127.1:{port}/article/1",
        f"http://0x7f.0.0.1:{port}/article/2",
        f"http://[::ffff:127.0.0.1]:{port}/article/3",
        f"http://0177.0.0.1:{port}/article/4",
    ]
    dump = tmp_path / "RS_2019-02.zst"
    write_dump(dump, [submission(url, 10 + i) for i, url in enumerate(links)])
    out = tmp_path / "webtext"
    flags = [*FAST_FLAGS, "--min-tokens", "10"]

    assert main(["webtext", "build", str(dump), "--out", str(out), *flags]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["fetch"] == {"in": 5, "kept": 0, "fetched_this_run": 5, "dropped": {"blocked_address": 5}}
    assert report["documents"] == 0
    assert sum(site_server.requests.values()) == 0  # not even robots.txt
    assert "blocked_address 5" in capsys.readouterr().err

    # Refused URLs are final: --retry-failed does not ask again ...
    assert main(["webtext", "build", str(dump), "--out", str(out), *flags, "--retry-failed"]) == 0
    assert sum(site_server.requests.values()) == 0
    # ... but with the guard off they are fetched (the server only listens on 127.0.0.1).
    assert (
        main(
            [
                "webtext",
                "build",
                str(dump),
                "--out",
                str(out),
                *flags,
                "--allow-private-addresses",
                "--timeout",
                "0.5",
                "--retries",
                "0",
            ]
        )
        == 0
    )
    assert crawl_rows(out / "crawl")[site_server.url("/article/0")][0] == "ok"
    assert site_server.requests["/article/0"] == 1


def test_a_name_that_resolves_to_loopback_is_refused(tmp_path, site_server):
    urls = tmp_path / "urls.ndjson.zst"
    url = f"http://localhost:{site_server.httpd.server_port}/article/0"  # /etc/hosts: 127.0.0.1 (and ::1)
    write_jsonl(urls, [{"url": url, "subreddit": "test", "score": 5, "title": "local"}])
    report = fetch_urls(urls, tmp_path / "crawl", options=FAST)
    assert report.dropped == {"blocked_address": 1} and sum(site_server.requests.values()) == 0

    allowed = fetch_urls(
        urls, tmp_path / "crawl", options=FetchOptions(**{**FAST.__dict__, "allow_private_addresses": True})
    )
    assert allowed.kept == 1 and site_server.requests["/article/0"] == 1  # the name does reach the server


def test_redirects_and_robots_redirects_to_private_addresses_are_refused(tmp_path, site_server):
    news, blog = site_server, SiteServer(Site())
    try:
        news_port, blog_port = news.httpd.server_port, blog.httpd.server_port
        news.site.pages.update(
            {
                "/go/literal": (302, {"Location": f"http://127.0.0.1:{news_port}/article/0"}, b""),
                "/go/localhost": (302, {"Location": f"http://localhost:{news_port}/article/1"}, b""),
                "/go/metadata": (301, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
                "/go/pinned": (302, {"Location": f"http://news.example.com:{news_port}/article/3"}, b""),
            }
        )
        blog.site.pages["/robots.txt"] = (302, {"Location": f"http://127.0.0.1:{blog_port}/robots-moved.txt"}, b"")
        paths = ["/go/literal", "/go/localhost", "/go/metadata", "/go/pinned", "/article/2"]
        records = [f"http://news.example.com:{news_port}{p}" for p in paths] + [
            f"http://blog.example.org:{blog_port}/article/4"
        ]
        urls = tmp_path / "urls.ndjson.zst"
        write_jsonl(urls, [{"url": u, "subreddit": "test", "score": 5, "title": u} for u in records])
        crawl = tmp_path / "crawl"
        # Both names are pinned to the loopback servers (trusted: the user named the address);
        # everything they redirect to is checked as usual.
        pins = ["--resolve", "news.example.com=127.0.0.1", "--resolve", "blog.example.org=127.0.0.1"]
        assert main(["webtext", "fetch", str(urls), "--out", str(crawl), *pins, *FAST_FLAGS]) == 0

        status = {url.split(":", 2)[2].split("/", 1)[1]: row[0] for url, row in crawl_rows(crawl).items()}
        # (a redirect to a host without a dot, like localhost, is no web address at all: bad_redirect)
        assert status == {
            "go/literal": "blocked_address",
            "go/localhost": "bad_redirect",
            "go/metadata": "blocked_address",
            "go/pinned": "ok",
            "article/2": "ok",
            "article/4": "blocked_address",
        }
        assert +news.requests == {
            "/robots.txt": 1,
            "/go/literal": 1,
            "/go/localhost": 1,
            "/go/metadata": 1,
            "/go/pinned": 1,
            "/article/3": 1,
            "/article/2": 1,
        }
        assert +blog.requests == {"/robots.txt": 1}  # its redirect was not followed, nor its page fetched

        before = (news.requests.copy(), blog.requests.copy())
        assert main(["webtext", "fetch", str(urls), "--out", str(crawl), *pins, *FAST_FLAGS, "--retry-failed"]) == 0
        assert (news.requests, blog.requests) == before  # refused URLs are never retried
    finally:
        blog.close()
