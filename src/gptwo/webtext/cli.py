"""`gptwo webtext urls|fetch|extract|build`."""

from __future__ import annotations

import argparse
import os
import sys

from gptwo.argtypes import Parser, command


def _cmd_webtext_report(reports: dict) -> int:
    import json

    for stage, counts in reports.items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in counts["dropped"].items()) or "none"
        print(f"{stage}: in {counts['in']}, kept {counts['kept']}; dropped: {dropped}", file=sys.stderr)
    print(json.dumps(reports, indent=2))
    return 0


def _cmd_webtext_url_filter(args: argparse.Namespace):
    from gptwo.webtext.urls import DEFAULT_BLOCKLIST, UrlFilter

    blocklist = (() if args.no_default_blocklist else DEFAULT_BLOCKLIST) + tuple(d.lower() for d in args.block_domain)
    return UrlFilter(min_score=args.min_score, blocklist=blocklist)


def _cmd_webtext_extract_options(args: argparse.Namespace):
    from gptwo.webtext.extract import ExtractOptions
    from gptwo.webtext.settings import pick

    languages = () if "any" in args.language else tuple(args.language or ("en",))
    return pick(ExtractOptions, args, languages=languages)


def _cmd_webtext_fetch_options(args: argparse.Namespace):
    from gptwo.webtext.fetch import FetchOptions
    from gptwo.webtext.settings import pick

    return pick(FetchOptions, args, resolve=tuple(args.resolve))


def _webtext_pin(text: str) -> tuple[str, str]:
    from gptwo.webtext.addresses import parse_pin

    try:
        return parse_pin(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cmd_webtext_urls(args: argparse.Namespace) -> int:
    from gptwo.webtext.pipeline import CrawlPipeline
    from gptwo.webtext.settings import pick
    from gptwo.webtext.urls import collect_urls

    report = collect_urls(args.inputs, args.out, rule=_cmd_webtext_url_filter(args), engine=pick(CrawlPipeline, args))
    return _cmd_webtext_report({"urls": report.as_dict()})


def _cmd_webtext_fetch(args: argparse.Namespace) -> int:
    from gptwo.webtext.fetch import fetch_urls
    from gptwo.webtext.pipeline import CrawlPipeline
    from gptwo.webtext.settings import pick

    report = fetch_urls(
        args.urls,
        args.out,
        options=_cmd_webtext_fetch_options(args),
        partitions=args.partitions,
        engine=pick(CrawlPipeline, args),
    )
    return _cmd_webtext_report({"fetch": report.as_dict()})


def _cmd_webtext_extract(args: argparse.Namespace) -> int:
    from gptwo.webtext.extract import extract_documents
    from gptwo.webtext.pipeline import CrawlPipeline
    from gptwo.webtext.settings import pick

    extracted, deduped = extract_documents(
        args.crawl, args.out, options=_cmd_webtext_extract_options(args), engine=pick(CrawlPipeline, args)
    )
    return _cmd_webtext_report({"extract": extracted.as_dict(), "dedup": deduped.as_dict()})


def _cmd_webtext_build(args: argparse.Namespace) -> int:
    from gptwo.webtext.corpus import build
    from gptwo.webtext.pipeline import CrawlPipeline
    from gptwo.webtext.settings import pick

    report = build(
        args.inputs,
        args.out,
        rule=_cmd_webtext_url_filter(args),
        fetch_options=_cmd_webtext_fetch_options(args),
        extract_options=_cmd_webtext_extract_options(args),
        engine=pick(CrawlPipeline, args),
        partitions=args.partitions,
    )
    _cmd_webtext_report(report["stages"])
    print(f"{report['documents']} documents -> {report['output']} (feed it to 'gptwo prepare')", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    """`gptwo webtext urls|fetch|extract|build`: Reddit links → fetched, filtered, deduplicated documents."""
    web = sub.add_parser(
        "webtext",
        help="Build a WebText-style corpus from Reddit submission dumps.",
        description="Build a WebText-style corpus: Reddit links with >= 3 karma, "
        "fetched, extracted, filtered, deduplicated.",
    )
    wsub = web.add_subparsers(dest="webtext_command", required=True, parser_class=Parser)

    def engine_args(p) -> None:
        p.add_argument(
            "--workers",
            type=int,
            default=os.cpu_count() or 1,
            help="parallel worker processes (default: number of CPUs)",
        )
        p.add_argument(
            "--engine",
            dest="kind",
            choices=("local", "ray"),
            default="local",
            help="'local' process pool (default) or 'ray' "
            "(a Ray cluster, or a single-machine Ray started for this run)",
        )
        p.add_argument(
            "--ray-address",
            default=None,
            help="address of a running Ray cluster, e.g. ray://head:10001 (with --engine ray)",
        )

    def url_args(p) -> None:
        p.add_argument(
            "--min-score", type=int, default=3, help="keep link posts with at least this score (default 3, as GPT-2)"
        )
        p.add_argument(
            "--block-domain",
            action="append",
            default=[],
            help="also drop links to this domain and its subdomains (repeatable)",
        )
        p.add_argument(
            "--no-default-blocklist",
            action="store_true",
            help="don't drop Wikipedia links (dropped by default, as GPT-2 did)",
        )

    def fetch_args(p) -> None:
        p.add_argument(
            "--concurrency", type=int, default=64, help="requests in flight at once, over all workers (default 64)"
        )
        p.add_argument("--per-host", type=int, default=2, help="requests in flight at once to one host (default 2)")
        p.add_argument(
            "--timeout", type=float, default=20.0, help="seconds for one request, body included (default 20)"
        )
        p.add_argument(
            "--retries", type=int, default=2, help="retries after a timeout, connection error, 429 or 5xx (default 2)"
        )
        p.add_argument(
            "--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry (default 1)"
        )
        p.add_argument("--max-redirects", type=int, default=5, help="redirects followed per URL (default 5)")
        p.add_argument(
            "--max-bytes", type=int, default=5_000_000, help="largest page downloaded, in bytes (default 5000000)"
        )
        p.add_argument("--user-agent", default=None, help="User-Agent header, also matched against robots.txt")
        p.add_argument(
            "--warc", action="store_true", help="also write every stored response to WARC files under the crawl folder"
        )
        p.add_argument(
            "--retry-failed", action="store_true", help="on resume, retry URLs that failed with timeouts or 5xx"
        )
        p.add_argument(
            "--allow-private-addresses",
            action="store_true",
            help="also fetch loopback, private, link-local and other non-global addresses, refused by default "
            "(a link or redirect could reach your own network or a cloud metadata service); for an intranet crawl",
        )
        p.add_argument(
            "--resolve",
            action="append",
            default=[],
            type=_webtext_pin,
            metavar="HOST=ADDRESS",
            help="connect to ADDRESS for HOST instead of asking DNS, even a private address "
            "(as curl --resolve; repeatable)",
        )
        p.add_argument(
            "--partitions", type=int, default=8, help="crawl partitions (by host), fixed by the first run (default 8)"
        )

    def extract_args(p) -> None:
        p.add_argument(
            "--language",
            action="append",
            default=[],
            help="keep documents in this language (ISO 639-1, repeatable; default en; 'any' keeps all)",
        )
        p.add_argument(
            "--min-language-prob", type=float, default=0.5, help="minimum language-detector probability (default 0.5)"
        )
        p.add_argument(
            "--min-tokens", type=int, default=128, help="drop documents with fewer GPT-2 tokens (default 128)"
        )
        p.add_argument(
            "--shingle-size", type=int, default=5, help="words per shingle for near-duplicate detection (default 5)"
        )
        p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
        p.add_argument(
            "--dedup-threshold",
            dest="threshold",
            type=float,
            default=0.5,
            help="Jaccard similarity above which documents are near duplicates (default 0.5)",
        )

    p = command(
        wsub,
        "urls",
        _cmd_webtext_urls,
        "Stage 1: Reddit submission dumps (.jsonl/.zst) or URL lists -> unique outbound URLs.",
    )
    p.add_argument("inputs", nargs="+", help="Pushshift submission dumps (NDJSON, optionally .zst) or plain URL lists")
    p.add_argument("--out", required=True, help="output URL file (.jsonl.zst)")
    url_args(p)
    engine_args(p)

    p = command(
        wsub,
        "fetch",
        _cmd_webtext_fetch,
        "Stage 2: fetch a URL file into a resumable crawl folder (robots.txt honoured).",
    )
    p.add_argument("urls", help="URL file written by 'gptwo webtext urls'")
    p.add_argument("--out", required=True, help="crawl folder; rerun with the same folder to resume")
    fetch_args(p)
    engine_args(p)

    p = command(
        wsub,
        "extract",
        _cmd_webtext_extract,
        "Stages 3-4: crawl folder -> extracted, filtered, deduplicated documents (.jsonl.zst).",
    )
    p.add_argument("crawl", help="crawl folder written by 'gptwo webtext fetch'")
    p.add_argument(
        "--out", required=True, help="output documents file (.jsonl.zst); per-partition files go to extract/ beside it"
    )
    extract_args(p)
    engine_args(p)

    p = command(
        wsub,
        "build",
        _cmd_webtext_build,
        "All stages: dumps or URL lists -> DIR/documents.jsonl.zst and DIR/report.json (resumable).",
    )
    p.add_argument("inputs", nargs="+", help="Pushshift submission dumps (NDJSON, optionally .zst) or plain URL lists")
    p.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
    url_args(p)
    fetch_args(p)
    extract_args(p)
    engine_args(p)
