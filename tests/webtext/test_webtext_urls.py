"""Stage 1: Reddit dumps and URL lists → unique outbound URLs."""

import pytest
from webtext_site import submission, write_dump

from gptwo.errors import GptwoError
from gptwo.webtext.records import read_jsonl
from gptwo.webtext.urls import UrlFilter, collect_urls, dedup_key, has_non_html_extension, normalize_url


def test_normalize_url_canonicalizes_and_rejects_non_http():
    assert (
        normalize_url(" HTTPS://News.Example.COM:443/a/b?utm_source=rd&id=7&fbclid=x#top ")
        == "https://news.example.com/a/b?id=7"
    )
    assert normalize_url("http://example.com") == "http://example.com/"
    assert normalize_url("http://example.com:8080/x") == "http://example.com:8080/x"
    assert (
        normalize_url("http://[::FFFF:8.8.8.8]:8080/x") == "http://[::ffff:8.8.8.8]:8080/x"
    )  # IPv6 keeps its brackets
    assert normalize_url("http://example.com/caf\udce9") is None  # a lone surrogate is no text
    for bad in (
        "ftp://example.com/file",
        "mailto:a@b.c",
        "javascript:alert(1)",
        "not a url",
        "http://",
        "http://localhost/x",
        "http://example.com:99999/",
    ):
        assert normalize_url(bad) is None, bad


def test_dedup_key_ignores_scheme_www_and_trailing_slash():
    assert dedup_key("http://www.example.com/story/") == dedup_key("https://example.com/story")
    assert dedup_key("https://example.com/story?id=1") != dedup_key("https://example.com/story?id=2")


def test_non_html_extensions():
    assert has_non_html_extension("https://i.example.com/cat.JPG")
    assert has_non_html_extension("https://example.com/paper.pdf?download=1")
    assert not has_non_html_extension("https://example.com/story.html")
    assert not has_non_html_extension("https://example.com/2019/01/story")


def test_dump_filtering_counts_every_drop_reason(tmp_path):
    dump = tmp_path / "RS_2019-01.zst"
    write_dump(
        dump,
        [
            submission("https://news.example.com/a", 10, subreddit="worldnews", title="Story A"),
            submission("https://news.example.com/b", 3),  # exactly at the threshold: kept
            submission("https://news.example.com/c", 2),  # below: low_score
            submission("https://www.reddit.com/r/news/comments/abc/self/", 50, is_self=True, selftext="hi"),
            submission("https://www.reddit.com/r/pics/comments/xyz/", 50),  # reddit-internal link
            submission("https://i.redd.it/picture.jpg", 90),
            submission("https://en.wikipedia.org/wiki/Language_model", 40),
            submission("https://cdn.example.com/photo.png", 40),
            submission("[deleted]", 30, title="[deleted by user]"),
            submission("https://news.example.com/removed", 30, removed_by_category="moderator"),
            submission("https://www.news.example.com/a/?utm_source=reddit", 5, subreddit="news", title="Story A again"),
            submission("ftp://files.example.com/x", 30),
            "{this is not json",
            "[1, 2, 3]",
            "",
        ],
    )
    out = tmp_path / "urls.jsonl.zst"
    report = collect_urls([dump], out)
    records = list(read_jsonl(out))
    assert {r["url"] for r in records} == {"https://news.example.com/a", "https://news.example.com/b"}
    story_a = next(r for r in records if r["url"].endswith("/a"))
    assert (story_a["subreddit"], story_a["score"], story_a["title"]) == ("worldnews", 10, "Story A")
    assert report.as_dict() == {
        "in": 14,
        "kept": 2,
        "dropped": {
            "bad_url": 1,
            "blocklisted": 1,
            "deleted": 2,
            "duplicate": 1,
            "low_score": 1,
            "malformed": 2,
            "non_html": 1,
            "self_post": 3,
        },
    }


def test_duplicates_keep_the_highest_scoring_post_and_the_score_is_configurable(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_dump(
        first,
        [submission("https://blog.example.org/post", 4, title="low"), submission("https://blog.example.org/other", 1)],
    )
    write_dump(second, [submission("http://blog.example.org/post/", 120, title="high")])
    out = tmp_path / "urls.jsonl.zst"
    report = collect_urls([first, second], out, rule=UrlFilter(min_score=1))
    records = list(read_jsonl(out))
    assert len(records) == 2 and report.dropped["duplicate"] == 1
    assert next(r for r in records if "post" in r["url"])["title"] == "high"


def test_plain_url_list_and_custom_blocklist(tmp_path):
    url_list = tmp_path / "urls.txt"
    url_list.write_text(
        "# my links\nhttps://a.example.com/x\nhttps://blocked.example.net/y\nhttps://en.wikipedia.org/wiki/GPT-2\nnot-a-url\n"
    )
    out = tmp_path / "urls.jsonl.zst"
    report = collect_urls([url_list], out, rule=UrlFilter(blocklist=("example.net",)))
    assert [r["url"] for r in read_jsonl(out)] == ["https://a.example.com/x", "https://en.wikipedia.org/wiki/GPT-2"]
    assert read_jsonl(out).__next__()["score"] is None
    assert dict(report.dropped) == {"blocklisted": 1, "bad_url": 1}


def test_dump_compressed_with_pushshifts_2gib_window_streams(tmp_path):
    import json

    import zstandard

    lines = "".join(json.dumps(submission(f"https://site{i}.example.com/p", 5)) + "\n" for i in range(500)).encode()
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31)
    dump = tmp_path / "RS_2020-04.zst"
    with open(dump, "wb") as f, zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as writer:
        writer.write(lines)  # streamed: no content size, so the frame declares its 2 GiB window
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().stream_reader(open(dump, "rb")).read()  # zstd's default limit refuses it
    report = collect_urls([dump], tmp_path / "urls.jsonl.zst")
    assert report.kept == 500


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(GptwoError, match="not found"):
        collect_urls([tmp_path / "nope.zst"], tmp_path / "out.jsonl.zst")
    assert not (tmp_path / "out.jsonl.zst").exists()
