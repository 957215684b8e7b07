"""WebText builder: Reddit submissions → outbound URLs (score >= 3) → fetched pages → extracted,
filtered, deduplicated documents, as GPT-2's WebText and OpenWebText(2) were made.

Stages (each runs alone and resumes): `collect_urls` → `fetch_urls` → `extract_documents`
(extract + dedup); `build` runs them all. Tasks run in local processes or on Ray (`Engine`).
"""

from gptwo.webtext.build import build
from gptwo.webtext.engine import Engine
from gptwo.webtext.extract import ExtractOptions, extract_documents
from gptwo.webtext.fetch import FetchOptions, fetch_urls
from gptwo.webtext.filters import count_tokens
from gptwo.webtext.records import StageReport
from gptwo.webtext.urls import UrlFilter, collect_urls, normalize_url

__all__ = [
    "Engine", "ExtractOptions", "FetchOptions", "StageReport", "UrlFilter",
    "build", "collect_urls", "count_tokens", "extract_documents", "fetch_urls", "normalize_url",
]
