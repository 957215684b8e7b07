"""Stage 1 — Reddit submissions to a deduplicated list of outbound URLs worth fetching.

Reads Pushshift submission dumps (one JSON object per line, optionally `.zst`) or plain URL
lists, line by line. Keeps link posts with score >= `min_score`, normalizes URLs, drops
blocklisted domains (Wikipedia by default, as GPT-2 did) and links to non-HTML files, and keeps
one record per URL (the highest-scoring post's).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gptwo.errors import GptwoError
from gptwo.webtext.engine import Engine
from gptwo.webtext.records import StageReport, open_text, write_jsonl

DEFAULT_BLOCKLIST = ("wikipedia.org",)

# Reddit's own hosts: links there are self posts, galleries or hosted media, not outbound links.
REDDIT_HOSTS = ("reddit.com", "redd.it", "redditmedia.com", "reddituploads.com")

NON_HTML_EXTENSIONS = frozenset(
    """jpg jpeg png gif gifv webp bmp tif tiff svg ico heic avif mp4 m4v webm mov avi mkv flv wmv
    mp3 m4a wav ogg oga flac aac pdf ps eps zip gz tgz bz2 xz 7z rar tar iso dmg exe msi apk deb rpm
    bin jar doc docx xls xlsx ppt pptx odt ods odp epub mobi csv tsv json xml rss swf torrent""".split()
)

TRACKING_PARAMS = ("utm_", "fbclid", "gclid", "mc_cid", "mc_eid", "ref_src")
DELETED_MARKERS = frozenset({"[deleted]", "[removed]", "[deleted by user]"})


@dataclass(frozen=True)
class UrlFilter:
    """What the URL stage keeps: minimum score and blocked domains (a domain blocks its subdomains)."""

    min_score: int = 3
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST

    def blocked(self, host: str) -> bool:
        return any(host == d or host.endswith("." + d) for d in self.blocklist)


def normalize_url(url: str) -> str | None:
    """Canonical form of an http(s) URL, or None if it is not one.

    Lowercases scheme and host, drops default ports, fragments and tracking parameters
    (utm_*, fbclid, ...), and turns an empty path into `/`.
    """
    url = url.strip()
    if not url or any(c.isspace() for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in ("http", "https") or not host or "." not in host:
        return None
    netloc = host if port is None or port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.lower().startswith(TRACKING_PARAMS)]
    )
    return urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def dedup_key(url: str) -> str:
    """Key under which two normalized URLs count as the same page: scheme, `www.` and a trailing
    slash don't matter."""
    parts = urlsplit(url)
    host = parts.netloc.removeprefix("www.")
    path = parts.path.rstrip("/") or "/"
    return f"{host}{path}?{parts.query}" if parts.query else f"{host}{path}"


def url_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def has_non_html_extension(url: str) -> bool:
    ext = posixpath.splitext(urlsplit(url).path)[1].lower().lstrip(".")
    return ext in NON_HTML_EXTENSIONS


def _is_deleted(post: dict[str, Any]) -> bool:
    return bool(post.get("removed_by_category")) or post.get("title") in DELETED_MARKERS or post.get("url") in DELETED_MARKERS


def _submission_record(post: dict[str, Any], rule: UrlFilter, report: StageReport) -> dict[str, Any] | None:
    """The URL record of one Pushshift submission, or None (with the drop reason counted)."""
    if _is_deleted(post):
        report.drop("deleted")
        return None
    if post.get("is_self") or not isinstance(post.get("url"), str):
        report.drop("self_post")
        return None
    try:
        score = int(post.get("score") or 0)
    except (TypeError, ValueError):
        report.drop("malformed")
        return None
    if score < rule.min_score:
        report.drop("low_score")
        return None
    return {
        "url": post["url"],
        "subreddit": post.get("subreddit"),
        "score": score,
        "title": post.get("title"),
    }


def _raw_records(path: Path, rule: UrlFilter, report: StageReport) -> Iterator[dict[str, Any]]:
    """Records of one input file, before URL checks. A file whose first non-blank line starts
    with `{` is a submission dump; anything else is a plain list of URLs (one per line)."""
    is_dump = None
    with open_text(path) as lines:
        for line in lines:
            line = line.strip()
            if not line or (is_dump is None and line.startswith("#")):
                continue
            if is_dump is None:
                is_dump = line.startswith("{")
            report.seen += 1
            if not is_dump:
                yield {"url": line, "subreddit": None, "score": None, "title": None}
                continue
            try:
                post = json.loads(line)
            except ValueError:
                post = None
            if not isinstance(post, dict):
                report.drop("malformed")
                continue
            record = _submission_record(post, rule, report)
            if record is not None:
                yield record


def _scan_file(path: str, rule: UrlFilter) -> tuple[list[dict[str, Any]], StageReport]:
    """Filter one input file (runs in a worker): the surviving records and the counts."""
    report = StageReport("urls")
    records = []
    for record in _raw_records(Path(path), rule, report):
        url = normalize_url(record["url"])
        if url is None:
            report.drop("bad_url")
            continue
        host = url_host(url)
        if host.removeprefix("www.").endswith(REDDIT_HOSTS):
            report.drop("self_post")
        elif rule.blocked(host):
            report.drop("blocklisted")
        elif has_non_html_extension(url):
            report.drop("non_html")
        else:
            record["url"] = url
            records.append(record)
    return records, report


def collect_urls(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    rule: UrlFilter = UrlFilter(),
    engine: Engine | None = None,
) -> StageReport:
    """Stage 1: write the unique outbound URLs of `inputs` to `out` (`.jsonl.zst`).

    Files are scanned in parallel (one task per file); duplicates across files keep the record of
    the highest-scoring post. Returns the stage's counts.
    """
    paths = [str(p) for p in inputs]
    if not paths:
        raise GptwoError("no input files given", "pass Reddit submission dumps (.jsonl/.zst) or URL lists")
    for p in paths:
        if not Path(p).is_file():
            raise GptwoError(f"input file not found: {p}", "check the path")
    engine = engine or Engine()
    report = StageReport("urls")
    best: dict[str, dict[str, Any]] = {}
    for records, file_report in engine.map(_scan_file, [(p, rule) for p in paths]):
        report.merge(file_report)
        for record in records:
            key = dedup_key(record["url"])
            held = best.get(key)
            if held is None:
                best[key] = record
            else:
                report.drop("duplicate")
                if (record["score"] or 0) > (held["score"] or 0):
                    best[key] = record
    report.kept = write_jsonl(out, best.values())
    return report
