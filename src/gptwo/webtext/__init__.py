"""WebText builder: Reddit submissions → outbound URLs (score >= 3) → fetched pages → extracted,
filtered, deduplicated documents, as GPT-2's WebText and OpenWebText(2) were made.

Stages (each runs alone and resumes): `collect_urls` → `fetch_urls` → `extract_documents`
(extract + dedup); `build` runs them all. Tasks run in local processes or on Ray (`CrawlPipeline`).
"""

from gptwo.lazy import lazy_names

_WHERE = {
    "CrawlPipeline": "gptwo.webtext.pipeline",
    "ExtractOptions": "gptwo.webtext.extract",
    "FetchOptions": "gptwo.webtext.fetch",
    "StageReport": "gptwo.webtext.records",
    "UrlFilter": "gptwo.webtext.urls",
    "build": "gptwo.webtext.corpus",
    "collect_urls": "gptwo.webtext.urls",
    "count_tokens": "gptwo.webtext.filters",
    "extract_documents": "gptwo.webtext.extract",
    "fetch_urls": "gptwo.webtext.fetch",
    "normalize_url": "gptwo.webtext.urls",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
