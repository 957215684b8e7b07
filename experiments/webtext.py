"""Throughput of the WebText extract + dedup stages on one machine, with the stage counts.

    python experiments/webtext.py [--pages 3000] [--workers 1,2] [--partitions 8]

Pages: HTML articles assembled from paragraphs of CPython's own documentation (real English, no
download), wrapped in navigation and footer boilerplate, stored in a crawl folder as the fetch
stage would. The mix: unique English articles plus exact duplicates (same article, other page
chrome), near duplicates (about one word in 40 changed), German pages and short pages. Workers are
started (and their models loaded) before the clock starts; that startup is reported on its own.
Prints a table and writes experiments/results/webtext.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from gptwo.fileio import atomic_write

GERMAN = (
    "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus er "
    "hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder aber vor "
    "zur bis mehr durch man sein wurde sei hatte kann gegen vom können schon wenn habe seine ihre dann"
).split()


def paragraphs() -> list[str]:
    """English paragraphs of at least 40 words from CPython's reference topics."""
    import pydoc_data.topics

    out = []
    for text in pydoc_data.topics.topics.values():
        for block in text.split("\n\n"):
            block = " ".join(block.split())
            if len(block.split()) >= 40 and block.count("(") < 5:
                out.append(block)
    return out


def html(title: str, body: list[str], chrome: int) -> str:
    paras = "".join(f"<p>{p}</p>" for p in body)
    return (
        f"<!DOCTYPE html><html><head><title>{title}</title></head><body>"
        f"<nav><a href='/'>Home</a> <a href='/s{chrome}'>Section {chrome}</a> <a href='/login'>Sign in</a></nav>"
        f"<article><h1>{title}</h1>{paras}</article><aside>Related: more stories {chrome}</aside>"
        f"<footer>Copyright {2000 + chrome % 20} Example Media. All rights reserved.</footer></body></html>"
    )


def make_pages(n_pages: int, seed: int = 0) -> tuple[dict[str, str], dict[str, int]]:
    """URL -> HTML for `n_pages` pages, and how many of each kind were made."""
    rng = random.Random(seed)
    pool = paragraphs()
    pages, bodies, kinds = {}, [], {"unique": 0, "exact_duplicate": 0, "near_duplicate": 0, "german": 0, "short": 0}
    for i in range(n_pages):
        roll = rng.random()
        title = f"Story {i}"
        if bodies and roll < 0.08:  # the same article (and headline) under another URL and page chrome
            kind, (title, body) = "exact_duplicate", rng.choice(bodies)
        elif bodies and roll < 0.14:
            kind, body = "near_duplicate", []
            for p in rng.choice(bodies)[1]:
                words = p.split()
                for j in range(0, len(words), 40):
                    words[min(len(words) - 1, j + rng.randint(0, 39))] = "changed"
                body.append(" ".join(words))
        elif roll < 0.17:
            kind, body = (
                "german",
                [" ".join(rng.choice(GERMAN) for _ in range(60)).capitalize() + "." for _ in range(6)],
            )
        elif roll < 0.20:
            kind, body = "short", [" ".join(rng.choice(pool).split()[:40])]
        else:
            kind, body = "unique", rng.sample(pool, 6)
            bodies.append((title, body))
        kinds[kind] += 1
        pages[f"https://site{i % 97}.example.com/story/{i}"] = html(title, body, chrome=i)
    return pages, kinds


def write_crawl(crawl_dir: Path, pages: dict[str, str], partitions: int) -> None:
    from gptwo.webtext.crawlstate import CrawlState, PageResult, open_crawl_dir, partition_of
    from gptwo.webtext.urls import url_host

    open_crawl_dir(crawl_dir, partitions)
    states = [CrawlState(crawl_dir / f"part-{i:05d}.sqlite") for i in range(partitions)]
    for state in states:
        state.db.execute("BEGIN")
    for url, page in pages.items():
        meta = {"url": url, "subreddit": "bench", "score": 3, "title": url}
        states[partition_of(url_host(url), partitions)].record(
            meta, PageResult("ok", http_status=200, final_url=url, body=page.encode())
        )
    for state in states:
        state.db.execute("COMMIT")
        state.close()


def cpu_seconds() -> float:
    """CPU time of this process and its live worker processes (Linux /proc), so throughput per
    CPU-second can be read even on a machine that other jobs share."""
    total = time.process_time()
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=3000, help="pages in the synthetic crawl")
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 1}", help="comma-separated worker counts to time")
    parser.add_argument("--partitions", type=int, default=8, help="crawl partitions (tasks for the workers)")
    parser.add_argument(
        "--json",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "webtext.json"),
        help="where to write the results",
    )
    args = parser.parse_args()

    from gptwo.webtext import CrawlPipeline, ExtractOptions
    from gptwo.webtext.dedup import deduplicate, signature_path
    from gptwo.webtext.extract import extract_documents

    pages, kinds = make_pages(args.pages)
    megabytes = sum(len(p.encode()) for p in pages.values()) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        crawl, warmup_crawl = Path(folder) / "crawl", Path(folder) / "warmup"
        write_crawl(crawl, pages, args.partitions)
        write_crawl(warmup_crawl, dict(list(pages.items())[: 4 * args.partitions]), args.partitions)
        for workers in sorted({int(w) for w in args.workers.split(",")}):
            # Start the workers and load their models (tokenizer, language model) before timing.
            start = time.perf_counter()
            extract_documents(
                warmup_crawl, Path(folder) / f"warm{workers}" / "d.jsonl.zst", engine=CrawlPipeline("local", workers)
            )
            startup = time.perf_counter() - start
            out = Path(folder) / f"w{workers}" / "documents.jsonl.zst"
            start, cpu_start = time.perf_counter(), cpu_seconds()
            extract, dedup = extract_documents(
                crawl, out, options=ExtractOptions(), engine=CrawlPipeline("local", workers)
            )
            total, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
            parts = sorted((out.parent / "extract").glob("*.ndjson.zst"))
            start = time.perf_counter()
            deduplicate([(p, signature_path(p)) for p in parts], out.parent / "again.jsonl.zst")
            dedup_seconds = time.perf_counter() - start
            rows.append(
                {
                    "workers": workers,
                    "startup_seconds": startup,
                    "pages": args.pages,
                    "documents": dedup.kept,
                    "seconds": total,
                    "cpu_seconds": cpu,
                    "cores_busy": cpu / total,
                    "pages_per_cpu_s": args.pages / cpu,
                    "pages_per_s": args.pages / total,
                    "documents_per_s": dedup.kept / total,
                    "dedup_seconds": dedup_seconds,
                    "dedup_documents_per_s": extract.kept / dedup_seconds,
                    "stages": {"extract": extract.as_dict(), "dedup": dedup.as_dict()},
                }
            )

    print(f"{args.pages} pages ({megabytes:.1f} MB HTML), made as {kinds}")
    print(
        f"{'workers':>7} {'startup s':>9} {'seconds':>8} {'pages/s':>8} {'docs/s':>8} {'cores busy':>10} "
        f"{'pages/CPU-s':>11} {'dedup alone docs/s':>19}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['startup_seconds']:>9.1f} {r['seconds']:>8.1f} {r['pages_per_s']:>8.1f} "
            f"{r['documents_per_s']:>8.1f} {r['cores_busy']:>10.2f} {r['pages_per_cpu_s']:>11.1f} "
            f"{r['dedup_documents_per_s']:>19.0f}"
        )
    for stage, counts in rows[-1]["stages"].items():
        print(f"{stage}: in {counts['in']}, kept {counts['kept']}, dropped {counts['dropped']}")
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "pages": args.pages,
        "html_mb": megabytes,
        "made": kinds,
        "runs": rows,
    }
    atomic_write(args.json, (json.dumps(result, indent=2) + "\n").encode())
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
