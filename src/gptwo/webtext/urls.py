"""Stage 1 — Reddit submissions to a deduplicated list of outbound URLs worth fetching.

Reads Pushshift submission dumps (one JSON object per line, optionally `.zst`) or plain URL
lists, line by line. Keeps link posts with score >= `min_score`, normalizes URLs, drops
blocklisted domains (Wikipedia by default, as GPT-2 did) and links to non-HTML files, and keeps
one record per URL (the highest-scoring post's).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gptwo.errors import GptwoError
from gptwo.webtext.pipeline import CrawlPipeline
from gptwo.webtext.records import DamagedStream, StageReport, check_output_file, open_text, write_jsonl

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
SQLITE_INT_LIMIT = 2**63  # scores are stored as SQLite integers: 64-bit signed
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may carry them; UTF-8 (and SQLite) can't


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
    if not url or any(c.isspace() for c in url) or LONE_SURROGATE.search(url):
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
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
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


def _score(value: Any) -> int:
    """A post's score as an integer SQLite can store; ValueError for anything else (1e308, NaN,
    'abc', true): such a record is counted as malformed and skipped, never clamped into a score."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"score {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"score {value!r}")
    score = int(value)
    if not -SQLITE_INT_LIMIT <= score < SQLITE_INT_LIMIT:
        raise ValueError(f"score {value!r}")
    return score


def _text(value: Any) -> str | None:
    """A post's title or subreddit: None or a string (lone surrogates, which can't be stored, replaced)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"text field {value!r}")
    return LONE_SURROGATE.sub("\ufffd", value)


def _submission_record(post: dict[str, Any], rule: UrlFilter, report: StageReport) -> dict[str, Any] | None:
    """The URL record of one Pushshift submission, or None (with the drop reason counted)."""
    try:
        score, title, subreddit = _score(post.get("score")), _text(post.get("title")), _text(post.get("subreddit"))
    except ValueError:
        report.drop("malformed")
        return None
    url = post.get("url")
    if post.get("removed_by_category") or title in DELETED_MARKERS or (isinstance(url, str) and url in DELETED_MARKERS):
        report.drop("deleted")
        return None
    if post.get("is_self") or not isinstance(url, str):
        report.drop("self_post")
        return None
    if score < rule.min_score:
        report.drop("low_score")
        return None
    return {"url": url, "subreddit": subreddit, "score": score, "title": title}


def _raw_records(path: Path, rule: UrlFilter, report: StageReport) -> Iterator[dict[str, Any]]:
    """Records of one input file, before URL checks. A file whose first non-blank line starts
    with `{` is a submission dump; anything else is a plain list of URLs (one per line)."""
    try:
        yield from _parse_lines(path, rule, report)
    except DamagedStream as err:
        read = f"; {report.seen} records were read before the damage" if report.seen else ""
        raise GptwoError(
            f"{path} is damaged: {err}{read}",
            "download the file again (or recompress it), then rerun; nothing was written",
        ) from None
    except OSError as err:
        raise GptwoError(
            f"can't read {path} ({err.strerror or err})", "check the file's permissions and the disk"
        ) from None


def _parse_lines(path: Path, rule: UrlFilter, report: StageReport) -> Iterator[dict[str, Any]]:
    is_dump = None
    with open_text(path) as lines:
        for line in lines:
            line = line.strip()
            if not line or (is_dump is None and line.startswith("#")):
                continue
            if is_dump is None:
                is_dump = line.startswith("{")
                if not is_dump and ("\x00" in line or "\ufffd" in line):
                    raise GptwoError(
                        f"{path} is neither a submission dump nor a URL list (it holds binary data)",
                        "pass Pushshift submission dumps (NDJSON, optionally .zst) or text files of URLs",
                    )
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


def _check_input(path: Path) -> None:
    """An input must be a file with something in it: a folder or an empty file is named as such."""
    if path.is_dir():
        raise GptwoError(
            f"{path} is a folder, not a dump file", f"pass the files inside it, e.g. {str(path).rstrip('/')}/*.zst"
        )
    if not path.is_file():
        raise GptwoError(f"input file not found: {path}", "check the path")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as err:
        raise GptwoError(
            f"can't read {path} ({err.strerror or err})", "check the file's permissions and the disk"
        ) from None
    if empty:
        raise GptwoError(f"input file {path} is empty", "download it again, or leave it out")


def collect_urls(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    rule: UrlFilter = UrlFilter(),
    engine: CrawlPipeline | None = None,
) -> StageReport:
    """Stage 1: write the unique outbound URLs of `inputs` to `out` (`.jsonl.zst`).

    Files are scanned in parallel (one task per file); duplicates across files keep the record of
    the highest-scoring post. Returns the stage's counts.
    """
    paths = [str(p) for p in inputs]
    if not paths:
        raise GptwoError("no input files given", "pass Reddit submission dumps (.jsonl/.zst) or URL lists")
    for p in paths:
        _check_input(Path(p))
    check_output_file(out)
    engine = engine or CrawlPipeline()
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
