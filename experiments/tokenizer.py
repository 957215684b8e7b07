"""Encode throughput of gptwo's GPT-2 tokenizer against transformers at its best, in one run.

    python experiments/tokenizer.py [--mb 8] [--rounds 5]

The anchor is transformers' fastest route to the same token ids: the Rust `tokenizers` backend of
GPT2TokenizerFast (`backend_tokenizer`), called directly with no special-token handling. Both tools
are timed one document at a time and batched (all cores), on the same texts, in interleaved rounds
(median kept); every document's ids are checked equal across all routes before timing. The Python
wrapper's own calls are listed too, for reference. Text: CPython's documentation and standard-library
sources (no download). Prints a table and writes experiments/results/tokenizer.json; ratios are against the
fastest transformers route measured in this run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import sysconfig
import tempfile
import time

from gptwo.fileio import atomic_write

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def corpus(megabytes: float) -> list[str]:
    """Python's topic docs and stdlib sources, repeated up to `megabytes` of UTF-8."""
    import pydoc_data.topics

    docs = list(pydoc_data.topics.topics.values())
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    out, size = [], 0
    while size < megabytes * 1e6:
        for doc in docs:
            out.append(doc)
            size += len(doc.encode())
            if size >= megabytes * 1e6:
                break
    return out


def routes(docs: list[str], threads: int) -> dict[str, tuple[str, callable]]:
    """Each route: (tool, function returning one id list per document)."""
    from transformers import GPT2TokenizerFast

    from gptwo import Tokenizer
    from gptwo.tokenizer import gpt2_files

    with tempfile.TemporaryDirectory() as folder:
        encoder, bpe = gpt2_files()
        shutil.copy(encoder, os.path.join(folder, "vocab.json"))
        shutil.copy(bpe, os.path.join(folder, "merges.txt"))
        hf = GPT2TokenizerFast.from_pretrained(folder)
    rust = hf.backend_tokenizer
    ours = Tokenizer.gpt2()
    return {
        "transformers Rust backend, one doc at a time": (
            "transformers",
            lambda: [rust.encode(d, add_special_tokens=False).ids for d in docs],
        ),
        "transformers Rust backend, encode_batch": (
            "transformers",
            lambda: [e.ids for e in rust.encode_batch(docs, add_special_tokens=False)],
        ),
        "transformers GPT2TokenizerFast.encode, one at a time": ("transformers", lambda: [hf.encode(d) for d in docs]),
        "transformers GPT2TokenizerFast(docs), batch": ("transformers", lambda: hf(docs)["input_ids"]),
        "gptwo Tokenizer.gpt2 encode_ordinary, one at a time": (
            "gptwo",
            lambda: [ours.encode_ordinary(d) for d in docs],
        ),
        f"gptwo Tokenizer.gpt2 encode_batch ({threads} threads)": (
            "gptwo",
            lambda: ours.encode_batch(docs, num_threads=threads),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of text to encode")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median kept)")
    parser.add_argument("--json", default=os.path.join(RESULTS, "tokenizer.json"), help="where to write the results")
    args = parser.parse_args()

    docs = corpus(args.mb)
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    threads = os.cpu_count() or 1
    cases = routes(docs, threads)
    reference = None
    for name, (_, fn) in cases.items():  # same ids for every document, by every route
        ids = fn()
        reference = reference or ids
        mismatched = sum(a != b for a, b in zip(ids, reference))
        assert len(ids) == len(docs) and mismatched == 0, f"{name}: {mismatched} of {len(docs)} documents differ"
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (_, fn) in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rows = [
        {"case": name, "tool": tool, "seconds": statistics.median(times[name])} for name, (tool, _) in cases.items()
    ]
    for row in rows:
        row["mb_per_s"] = megabytes / row["seconds"]
    anchor = max((r for r in rows if r["tool"] == "transformers"), key=lambda r: r["mb_per_s"])
    print(
        f"GPT-2 BPE encode, {len(docs)} documents, {megabytes:.1f} MB, {threads} CPU threads, "
        f"{platform.processor() or platform.machine()}; "
        f"median of {args.rounds} interleaved rounds; ids checked equal on all documents"
    )
    print(f"{'case':<56} {'MB/s':>8} {'vs transformers best':>21}")
    for row in rows:
        row["ratio_vs_anchor"] = row["mb_per_s"] / anchor["mb_per_s"]
        print(f"{row['case']:<56} {row['mb_per_s']:>8.2f} {row['ratio_vs_anchor']:>20.2f}x")
    print(f"anchor: {anchor['case']}")
    atomic_write(
        args.json,
        json.dumps(
            {
                "megabytes": megabytes,
                "documents": len(docs),
                "threads": threads,
                "rounds": args.rounds,
                "anchor": anchor["case"],
                "rows": rows,
            },
            indent=2,
        ).encode(),
    )


if __name__ == "__main__":
    main()
