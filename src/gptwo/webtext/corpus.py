"""All stages in one resumable run: dumps or URL lists → `DIR/documents.jsonl.zst` + `DIR/report.json`.

Layout of DIR: `urls.ndjson.zst` (stage 1), `crawl/` (stage 2, SQLite per partition, resumable),
`extract/` (stage 3, per partition), `documents.jsonl.zst` (stage 4) — the file `gptwo prepare`
reads, and the only `.jsonl*` file in DIR, so `gptwo prepare DIR` reads just it — and
`report.json` with the counts of every stage. Rerunning the same command continues an
interrupted build: the URL stage is reused when its inputs are unchanged, fetched pages are never
fetched again, and unchanged partitions are not extracted again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptwo.errors import GptwoError
from gptwo.webtext.extract import ExtractOptions, extract_documents
from gptwo.webtext.fetch import FetchOptions, fetch_urls
from gptwo.webtext.pipeline import CrawlPipeline
from gptwo.webtext.records import StageReport, read_cache, write_json
from gptwo.webtext.urls import UrlFilter, collect_urls

DOCUMENTS_FILE = "documents.jsonl.zst"
URLS_FILE = "urls.ndjson.zst"  # intermediate files are .ndjson, which `gptwo prepare` skips
REPORT_FILE = "report.json"


def _inputs_fingerprint(inputs: list[str], rule: UrlFilter) -> dict[str, Any]:
    files = [{"path": os.path.abspath(p), "size": os.path.getsize(p), "mtime": os.path.getmtime(p)} for p in inputs]
    return {"inputs": files, "filter": asdict(rule)}


def _url_stage(inputs: list[str], out_dir: Path, rule: UrlFilter, engine: CrawlPipeline) -> StageReport:
    urls_path, meta_path = out_dir / URLS_FILE, out_dir / "urls.report.json"
    fingerprint = _inputs_fingerprint(inputs, rule) if all(os.path.isfile(p) for p in inputs) else None
    previous = read_cache(meta_path, "fingerprint", "report") if fingerprint and urls_path.is_file() else None
    if previous is not None and previous["fingerprint"] == fingerprint and isinstance(previous["report"], dict):
        return StageReport.from_dict("urls", previous["report"])
    report = collect_urls(inputs, urls_path, rule=rule, engine=engine)
    write_json(meta_path, {"fingerprint": fingerprint, "report": report.as_dict()})
    return report


def build(
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    rule: UrlFilter = UrlFilter(),
    fetch_options: FetchOptions = FetchOptions(),
    extract_options: ExtractOptions = ExtractOptions(),
    engine: CrawlPipeline | None = None,
    partitions: int = 8,
) -> dict[str, Any]:
    """Run every stage into `out_dir`; returns the report also written to `out_dir/report.json`."""
    engine = engine or CrawlPipeline()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GptwoError(
            f"--out {out_dir} is a file, not a folder", "choose a folder for the build (it is created if missing)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [str(p) for p in inputs]
    fetch_options.check()
    extract_options.check()
    urls_report = _url_stage(inputs, out_dir, rule, engine)
    fetch_report = fetch_urls(
        out_dir / URLS_FILE, out_dir / "crawl", options=fetch_options, partitions=partitions, engine=engine
    )
    extract_report, dedup_report = extract_documents(
        out_dir / "crawl",
        out_dir / DOCUMENTS_FILE,
        options=extract_options,
        engine=engine,
        work_dir=out_dir / "extract",
    )
    report = {
        "documents": dedup_report.kept,
        "output": str(out_dir / DOCUMENTS_FILE),
        "stages": {r.stage: r.as_dict() for r in (urls_report, fetch_report, extract_report, dedup_report)},
    }
    write_json(out_dir / REPORT_FILE, report)
    return report
