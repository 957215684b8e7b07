"""Stage 3 — fetched pages to clean documents.

Per page: main text with trafilatura (boilerplate, menus and comments removed), mojibake repaired
with ftfy, kept only in the wanted languages (py3langid) and with at least `min_tokens` GPT-2
tokens (length is checked first: it is the cheaper test). Each crawl partition is one task; a task
writes its documents, their MinHash signatures (for the dedup stage) and its counts, and is skipped
on a rerun if its partition hasn't changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptwo.errors import GptwoError
from gptwo.webtext.crawlstate import CrawlState, partition_paths
from gptwo.webtext.dedup import deduplicate, sidecar_path, signature, signature_path
from gptwo.webtext.filters import detect_language, has_min_tokens
from gptwo.webtext.pipeline import CrawlPipeline
from gptwo.webtext.records import AtomicFile, JsonlWriter, StageReport, check_output_file, read_cache, write_json


@dataclass(frozen=True)
class ExtractOptions:
    """Filters and near-duplicate settings. `languages=()` keeps every language."""

    languages: tuple[str, ...] = ("en",)
    min_language_prob: float = 0.5
    min_tokens: int = 128
    shingle_size: int = 5
    num_perm: int = 128
    threshold: float = 0.5

    def check(self) -> None:
        if not 0 < self.threshold <= 1:
            raise GptwoError(f"--dedup-threshold must be in (0, 1] (got {self.threshold})", "use e.g. 0.5")
        if self.shingle_size < 1 or self.num_perm < 2 or self.min_tokens < 0:
            raise GptwoError(
                "--shingle-size must be >= 1, --num-perm >= 2, --min-tokens >= 0", "check the extract options"
            )
        if not 0 <= self.min_language_prob <= 1:
            raise GptwoError(f"--min-language-prob must be in [0, 1] (got {self.min_language_prob})", "use e.g. 0.5")


def page_text(body: bytes, url: str | None = None, content_type: str | None = None) -> str | None:
    """Main text of an HTML page (repaired), or None if it has none. The charset of the
    Content-Type header wins; without one, trafilatura detects the encoding."""
    import ftfy
    import trafilatura

    html: bytes | str = body
    charset = _charset(content_type)
    if charset:
        try:
            html = body.decode(charset, errors="replace")
        except LookupError:  # a charset Python doesn't know: let trafilatura guess
            pass
    try:
        text = trafilatura.extract(html, url=url, include_comments=False, include_tables=False, deduplicate=False)
    except Exception:  # noqa: BLE001 - a page trafilatura can't parse simply has no text
        return None
    if not text:
        return None
    return ftfy.fix_text(text).strip() or None


def _charset(content_type: str | None) -> str | None:
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip(" \"'"):
            return value.strip(" \"'")
    return None


def page_document(page: dict[str, Any], options: ExtractOptions, report: StageReport) -> dict[str, Any] | None:
    """The document of one fetched page, or None with the reason counted in `report`."""
    text = page_text(page["body"], page["final_url"] or page["url"], page["content_type"])
    if text is None:
        report.drop("no_text")
        return None
    if not has_min_tokens(text, options.min_tokens):
        report.drop("too_short")
        return None
    if options.languages:
        lang, prob = detect_language(text)
        if lang not in options.languages or prob < options.min_language_prob:
            report.drop("language")
            return None
    return {
        "url": page["url"],
        "subreddit": page["subreddit"],
        "score": page["score"],
        "title": page["title"],
        "text": text,
    }


def extract_partition(db_path: str, docs_path: str, options: ExtractOptions) -> dict[str, Any]:
    """Extract one crawl partition into `docs_path` plus its signatures; returns its counts.
    Reuses the previous output when the partition and the options are unchanged."""
    report_path = sidecar_path(docs_path, ".report.json")
    state = CrawlState(db_path)
    try:
        pages = state.count_ok()
        previous = read_cache(report_path, "pages", "options", "report")
        if (
            previous is not None
            and previous["pages"] == pages
            and previous["options"] == json.loads(json.dumps(asdict(options)))
            and isinstance(previous["report"], dict)
            and {"in", "kept", "dropped"} <= previous["report"].keys()
            and Path(docs_path).is_file()
            and signature_path(docs_path).is_file()
        ):
            return previous["report"]
        report = StageReport("extract")
        signatures = []
        with JsonlWriter(docs_path) as writer:
            for page in state.pages():
                report.seen += 1
                doc = page_document(page, options, report)
                if doc is not None:
                    writer.write(doc)
                    signatures.append(signature(doc["text"], options.shingle_size, options.num_perm))
        report.kept = writer.count
    finally:
        state.close()
    with AtomicFile(signature_path(docs_path), "wb") as f:
        np.save(f, np.array(signatures, dtype=np.uint32).reshape(len(signatures), options.num_perm))
    write_json(report_path, {"pages": pages, "options": asdict(options), "report": report.as_dict()})
    return report.as_dict()


def extract_documents(
    crawl_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: ExtractOptions = ExtractOptions(),
    engine: CrawlPipeline | None = None,
    work_dir: str | os.PathLike | None = None,
) -> tuple[StageReport, StageReport]:
    """Stages 3 and 4: every stored page of `crawl_dir` → filtered, deduplicated documents in `out`
    (`.jsonl.zst`: url, subreddit, score, title, text). Per-partition files go to `work_dir`
    (default: `extract/` beside `out`). Returns the extract and dedup counts."""
    options.check()
    check_output_file(out)
    engine = engine or CrawlPipeline()
    dbs = [p for p in partition_paths(crawl_dir) if p.exists()]
    work_dir = Path(work_dir) if work_dir else Path(out).parent / "extract"
    work_dir.mkdir(parents=True, exist_ok=True)
    docs_paths = [str(work_dir / db.name.replace(".sqlite", ".ndjson.zst")) for db in dbs]
    extract_report = StageReport("extract")
    for part in engine.map(extract_partition, [(str(db), docs, options) for db, docs in zip(dbs, docs_paths)]):
        extract_report.merge(StageReport.from_dict("extract", part))
    dedup_report = deduplicate(
        [(docs, signature_path(docs)) for docs in docs_paths],
        out,
        threshold=options.threshold,
        num_perm=options.num_perm,
    )
    return extract_report, dedup_report
