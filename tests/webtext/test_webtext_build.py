"""`gptwo webtext build`: a generated Reddit dump → documents that `gptwo prepare` reads, on each engine."""

import json

import pytest
import zstandard
from webtext_site import submission, write_dump

from gptwo.cli import main
from gptwo.data.sources import iter_documents
from gptwo.errors import GptwoError
from gptwo.webtext import CrawlPipeline, ExtractOptions, FetchOptions, build
from gptwo.webtext.records import read_jsonl
from gptwo.webtext.urls import UrlFilter, collect_urls

# The test site is on 127.0.0.1, which the crawler refuses unless told otherwise.
FAST_FLAGS = [
    "--allow-private-addresses",
    "--timeout",
    "0.5",
    "--retries",
    "1",
    "--backoff",
    "0.01",
    "--max-bytes",
    "1000000",
    "--partitions",
    "3",
]
FAST = FetchOptions(timeout=0.5, retries=1, backoff=0.01, max_bytes=1_000_000, allow_private_addresses=True)

# Paths linked from the dump with enough karma, and which of them end up as documents.
LINKED = [
    "/article/0",
    "/article/1",
    "/article/2",
    "/article/3",
    "/dup/exact",
    "/dup/near",
    "/foreign/de",
    "/short",
    "/missing",
    "/error",
    "/loop/a",
    "/binary",
    "/malformed",
    "/private/secret",
    "/moved",
]
DOCUMENTS = ["/article/0", "/article/1", "/article/2", "/article/3", "/malformed", "/moved"]


def make_dump(path, server):
    posts = [submission(server.url(p), 3 + i, subreddit=f"sub{i % 3}", title=f"Post {p}") for i, p in enumerate(LINKED)]
    posts += [
        submission(server.url("/article/4"), 2),  # low score: never fetched
        submission(server.url("/article/0") + "?utm_source=reddit", 50),  # duplicate URL
        submission("https://www.reddit.com/r/x/comments/1/hello/", 99, is_self=True),
        submission("https://en.wikipedia.org/wiki/Reddit", 99),
        submission(server.url("/photo.jpg"), 99),
        submission("[deleted]", 10, title="[deleted]"),
        '{"truncated": ',
    ]
    write_dump(path, posts)
    return path


def test_build_cli_end_to_end_and_rerun(tmp_path, site_server, capsys):
    dump = make_dump(tmp_path / "RS_2019-01.zst", site_server)
    out = tmp_path / "webtext"
    assert main(["webtext", "build", str(dump), "--out", str(out), "--workers", "1", *FAST_FLAGS]) == 0

    docs = list(read_jsonl(out / "documents.jsonl.zst"))
    assert sorted(d["url"] for d in docs) == sorted(site_server.url(p) for p in DOCUMENTS)
    article0 = next(d for d in docs if d["url"].endswith("/article/0"))
    assert article0["score"] == 50 and article0["subreddit"] == "news" and article0["text"].count(".") > 20
    assert "/article/4" not in site_server.requests

    report = json.loads((out / "report.json").read_text())
    assert report["documents"] == len(DOCUMENTS)
    stages = report["stages"]
    assert stages["urls"] == {
        "in": 22,
        "kept": 15,
        "dropped": {
            "blocklisted": 1,
            "deleted": 1,
            "duplicate": 1,
            "low_score": 1,
            "malformed": 1,
            "non_html": 1,
            "self_post": 1,
        },
    }
    assert stages["fetch"] == {
        "in": 15,
        "kept": 10,
        "fetched_this_run": 15,
        "dropped": {"http_404": 1, "http_500": 1, "not_html": 1, "redirect_loop": 1, "robots_disallowed": 1},
    }
    assert stages["extract"] == {"in": 10, "kept": 8, "dropped": {"language": 1, "too_short": 1}}
    assert stages["dedup"] == {"in": 8, "kept": 6, "dropped": {"exact_duplicate": 1, "near_duplicate": 1}}
    printed = json.loads(capsys.readouterr().out)
    assert printed == stages

    # The output feeds `gptwo prepare` as it is: a file, or the whole folder.
    texts = sorted(d["text"] for d in docs)
    assert sorted(iter_documents([str(out / "documents.jsonl.zst")])) == texts
    assert sorted(iter_documents([str(out)])) == texts

    # Rerunning resumes: nothing is fetched again and the result is the same.
    before = site_server.requests.copy()
    assert main(["webtext", "build", str(dump), "--out", str(out), "--workers", "1", *FAST_FLAGS]) == 0
    assert site_server.requests == before
    assert list(read_jsonl(out / "documents.jsonl.zst")) == docs


def test_stage_commands_chain(tmp_path, site_server, capsys):
    dump = make_dump(tmp_path / "dump.jsonl", site_server)
    urls, crawl, docs = tmp_path / "urls.ndjson.zst", tmp_path / "crawl", tmp_path / "docs.jsonl.zst"
    assert main(["webtext", "urls", str(dump), "--out", str(urls), "--min-score", "3", "--workers", "1"]) == 0
    assert main(["webtext", "fetch", str(urls), "--out", str(crawl), "--workers", "1", *FAST_FLAGS]) == 0
    assert main(["webtext", "extract", str(crawl), "--out", str(docs), "--workers", "1", "--language", "en"]) == 0
    assert sorted(d["url"] for d in read_jsonl(docs)) == sorted(site_server.url(p) for p in DOCUMENTS)
    err = capsys.readouterr().err
    assert "urls: in 22, kept 15" in err and "dedup: in 8, kept 6" in err


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["webtext", "build", str(tmp_path / "missing.zst"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input file not found") and " — " in err and "\n" not in err
    assert main(["webtext", "build", str(tmp_path), "--out", str(tmp_path / "o"), "--dedup-threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(["webtext", "extract", str(tmp_path), "--out", str(tmp_path / "d.jsonl.zst")]) == 2
    assert "not a crawl folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["webtext", "fetch", "u.zst", "--out", "c", "--engine", "spark"])
    assert exit_info.value.code == 2


def test_every_package_name_is_the_object_its_module_defines():
    """`from gptwo.webtext import build` is the function, also once every stage module is imported
    (as `gptwo webtext build` does): no submodule of the package shares an exported name."""
    import importlib
    import pkgutil

    import gptwo.webtext as package

    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    assert not submodules & set(package._WHERE)
    for submodule in submodules:
        importlib.import_module(f"gptwo.webtext.{submodule}")
    for name, module in package._WHERE.items():
        assert getattr(package, name) is getattr(importlib.import_module(module), name), name
    assert callable(package.build) and package.CrawlPipeline().kind == "local"


@pytest.mark.parametrize(
    "engine", [CrawlPipeline("local", workers=2), CrawlPipeline("ray", workers=2)], ids=["processes", "ray"]
)
def test_parallel_engines_give_the_same_documents(tmp_path, site_server, engine):
    dump = make_dump(tmp_path / "dump.jsonl", site_server)
    if engine.kind == "ray":
        import ray
    try:
        report = build(
            [dump],
            tmp_path / "out",
            rule=UrlFilter(),
            fetch_options=FAST,
            extract_options=ExtractOptions(),
            engine=engine,
            partitions=4,
        )
        if engine.kind == "ray":
            assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2  # a local Ray instance ran the tasks
        # A user error inside a task reaches the caller as itself, on either engine (the CLI's one line).
        cut = tmp_path / "cut.zst"
        cut.write_bytes(zstandard.ZstdCompressor().compress(dump.read_bytes())[:-4])
        with pytest.raises(GptwoError, match=r"^\S*cut.zst is damaged: the zstd stream ends mid-frame[^\n]*$"):
            collect_urls([cut, dump], tmp_path / "urls.ndjson.zst", engine=engine)
    finally:
        if engine.kind == "ray":
            ray.shutdown()
    assert sorted(d["url"] for d in read_jsonl(tmp_path / "out" / "documents.jsonl.zst")) == sorted(
        site_server.url(p) for p in DOCUMENTS
    )
    assert report["stages"]["fetch"]["kept"] == 10 and report["documents"] == len(DOCUMENTS)
    assert max(site_server.requests.values()) <= 2  # retries aside, each URL fetched once
