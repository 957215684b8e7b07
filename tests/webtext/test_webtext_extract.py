"""Stages 3-4: extraction, repair, language and length filters, exact and near-duplicate removal."""

import pytest
from webtext_site import ENGLISH, FRENCH, GERMAN, article_html, near_duplicate, words_text

from gptwo.errors import GptwoError
from gptwo.tokenizer import Tokenizer
from gptwo.webtext.crawlstate import CrawlState, PageResult, open_crawl_dir
from gptwo.webtext.dedup import shingles, signature
from gptwo.webtext.extract import ExtractOptions, extract_documents, page_text
from gptwo.webtext.filters import count_tokens, detect_language, has_min_tokens
from gptwo.webtext.records import read_jsonl


def make_crawl(crawl_dir, pages: dict[str, str], partitions: int = 1):
    """A crawl folder holding `pages` (url -> html) as if fetched."""
    open_crawl_dir(crawl_dir, partitions)
    for i in range(partitions):
        state = CrawlState(crawl_dir / f"part-{i:05d}.sqlite")
        for n, (url, html) in enumerate(pages.items()):
            if n % partitions == i:
                meta = {"url": url, "subreddit": "sub", "score": 7, "title": f"title of {url}"}
                state.record(meta, PageResult("ok", http_status=200, final_url=url, body=html.encode("utf-8")))
        state.close()
    return crawl_dir


def test_page_text_keeps_the_article_and_drops_boilerplate():
    paragraphs = words_text(ENGLISH, 300, seed=1)
    text = page_text(article_html("Title", paragraphs, nav="Subscribe to our newsletter").encode())
    assert paragraphs[0] in text and paragraphs[-1] in text
    assert "newsletter" not in text and "Copyright" not in text


def test_page_text_survives_malformed_and_non_html_input():
    broken = article_html("T", words_text(ENGLISH, 300, seed=2)).replace("</p>", "<div><span>")[:-30]
    assert len(page_text(broken.encode())) > 1000
    assert page_text(bytes(range(256)) * 50) is None
    assert page_text(b"") is None


def test_mojibake_is_repaired():
    paragraphs = words_text(ENGLISH, 200, seed=3)
    paragraphs[0] = "The Mona Lisa doesn\u00e2\u20ac\u2122t have eyebrows. " + paragraphs[0]
    text = page_text(article_html("Art", paragraphs).encode())
    assert "doesn't have eyebrows" in text and "\u00e2\u20ac" not in text


def test_header_charset_decides_the_encoding():
    paragraphs = words_text(ENGLISH, 200, seed=9)
    paragraphs[0] = "Caf\u00e9 cr\u00e8me and na\u00efve r\u00e9sum\u00e9s. " + paragraphs[0]
    latin1 = article_html("Menu", paragraphs).replace("charset='utf-8'", "").encode("latin-1")
    text = page_text(latin1, content_type="text/html; charset=ISO-8859-1")
    assert "Caf\u00e9 cr\u00e8me and na\u00efve r\u00e9sum\u00e9s." in text
    assert page_text(latin1, content_type='text/html; charset="no-such-charset"') is not None


def test_language_detection_works_offline_on_generated_text():
    assert detect_language(" ".join(words_text(ENGLISH, 200, seed=4)))[0] == "en"
    assert detect_language(" ".join(words_text(GERMAN, 200, seed=5)))[0] == "de"
    assert detect_language(" ".join(words_text(FRENCH, 200, seed=6)))[0] == "fr"


def test_token_count_is_gpt2_bpe_and_the_length_filter_is_exact():
    text = " ".join(words_text(ENGLISH, 400, seed=7))
    ids = Tokenizer.gpt2().encode(text)
    assert count_tokens(text) == len(ids)
    exactly_128 = Tokenizer.gpt2().decode(ids[:128])
    assert count_tokens(exactly_128) == 128
    assert has_min_tokens(exactly_128, 128) and not has_min_tokens(exactly_128, 129)
    assert has_min_tokens("antidisestablishmentarianism " * 30, 100)  # 30 words, but over 100 tokens


def test_shingles_and_signatures():
    assert shingles("One two three four five six", 5) == {"one two three four five", "two three four five six"}
    assert shingles("Too short", 5) == {"too short"}
    a = " ".join(words_text(ENGLISH, 500, seed=8))
    assert (signature(a) == signature(a.upper())).all()
    assert signature(a, num_perm=64).shape == (64,)


def test_extract_filters_and_deduplicates(tmp_path):
    base = "http://site.example.com"
    originals = {i: words_text(ENGLISH, 400, seed=20 + i) for i in range(4)}
    pages = {f"{base}/a{i}": article_html(f"A{i}", p) for i, p in originals.items()}
    pages[f"{base}/exact"] = article_html("A0", originals[0], nav="Other menu")
    pages[f"{base}/near"] = article_html("A1 updated", near_duplicate(originals[1], seed=5))
    pages[f"{base}/de"] = article_html("DE", words_text(GERMAN, 400, seed=30))
    pages[f"{base}/short"] = article_html("Short", words_text(ENGLISH, 50, seed=31))
    pages[f"{base}/nav-only"] = "<html><body><nav>Home</nav></body></html>"
    crawl = make_crawl(tmp_path / "crawl", pages, partitions=3)

    out = tmp_path / "documents.jsonl.zst"
    extract, dedup = extract_documents(crawl, out)
    docs = list(read_jsonl(out))
    assert sorted(d["url"] for d in docs) == sorted(f"{base}/a{i}" for i in range(4))
    assert set(docs[0]) == {"url", "subreddit", "score", "title", "text"}
    assert docs[0]["subreddit"] == "sub" and docs[0]["score"] == 7
    assert extract.as_dict() == {"in": 9, "kept": 6, "dropped": {"language": 1, "too_short": 2}}
    assert dedup.as_dict() == {"in": 6, "kept": 4, "dropped": {"exact_duplicate": 1, "near_duplicate": 1}}

    # A stricter threshold keeps the near duplicate (its Jaccard similarity is about 0.75) ...
    strict = tmp_path / "strict.jsonl.zst"
    _, dedup = extract_documents(crawl, strict, options=ExtractOptions(threshold=0.95), work_dir=tmp_path / "x")
    assert dedup.kept == 5 and f"{base}/near" in {d["url"] for d in read_jsonl(strict)}
    # ... and all languages and lengths can be let through.
    _, dedup = extract_documents(
        crawl, strict, options=ExtractOptions(languages=(), min_tokens=0), work_dir=tmp_path / "y"
    )
    assert dedup.kept == 7


def test_unchanged_partitions_are_not_extracted_again(tmp_path):
    pages = {f"http://h{i}.example.com/": article_html("x", words_text(ENGLISH, 300, seed=40 + i)) for i in range(2)}
    crawl = make_crawl(tmp_path / "crawl", pages, partitions=2)
    out = tmp_path / "documents.jsonl.zst"
    extract_documents(crawl, out)
    part = tmp_path / "extract" / "part-00000.ndjson.zst"
    first = part.stat().st_mtime_ns
    extract_documents(crawl, out)
    assert part.stat().st_mtime_ns == first
    extract_documents(crawl, out, options=ExtractOptions(min_tokens=10))
    assert part.stat().st_mtime_ns != first


def test_bad_extract_options_and_missing_crawl_are_user_errors(tmp_path):
    with pytest.raises(GptwoError, match="threshold"):
        extract_documents(tmp_path, tmp_path / "o.jsonl.zst", options=ExtractOptions(threshold=1.5))
    with pytest.raises(GptwoError, match="not a crawl folder"):
        extract_documents(tmp_path, tmp_path / "o.jsonl.zst")
