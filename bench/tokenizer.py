"""Encode throughput of gptwo's GPT-2 tokenizer vs transformers' GPT2TokenizerFast, in one run.

    python bench/tokenizer.py [--mb 8] [--repeats 3]

Text: CPython's own documentation and standard-library sources (no download). Prints a table and
writes bench/results/tokenizer.json. Ratios are against GPT2TokenizerFast measured in this run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sysconfig
import tempfile
import time


def corpus(megabytes: float) -> list[str]:
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


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of text to encode")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--json", default="bench/results/tokenizer.json", help="where to write the results")
    args = parser.parse_args()

    from transformers import GPT2TokenizerFast

    from gptwo import Tokenizer
    from gptwo.tokenizer import gpt2_files

    docs = corpus(args.mb)
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        encoder, bpe = gpt2_files()
        shutil.copy(encoder, os.path.join(folder, "vocab.json"))
        shutil.copy(bpe, os.path.join(folder, "merges.txt"))
        hf = GPT2TokenizerFast.from_pretrained(folder)
    ours = Tokenizer.gpt2()
    assert [ours.encode_ordinary(d) for d in docs[:20]] == [hf.encode(d) for d in docs[:20]]
    threads = os.cpu_count() or 1
    cases = {
        "transformers GPT2TokenizerFast, one doc at a time": lambda: [hf.encode(d) for d in docs],
        "transformers GPT2TokenizerFast, batch": lambda: hf(docs)["input_ids"],
        "gptwo Tokenizer.gpt2, one doc at a time": lambda: [ours.encode_ordinary(d) for d in docs],
        f"gptwo Tokenizer.gpt2, encode_batch ({threads} threads)": lambda: ours.encode_batch(docs, num_threads=threads),
    }
    rows = []
    for name, fn in cases.items():
        seconds = best_time(fn, args.repeats)
        rows.append({"case": name, "seconds": seconds, "mb_per_s": megabytes / seconds})
    anchor = rows[0]["mb_per_s"]
    print(f"GPT-2 BPE encode, {megabytes:.1f} MB, {threads} CPU threads, {platform.processor() or platform.machine()}")
    print(f"{'case':<58} {'MB/s':>8} {'vs HF one-at-a-time':>20}")
    for row in rows:
        row["ratio_vs_hf"] = row["mb_per_s"] / anchor
        print(f"{row['case']:<58} {row['mb_per_s']:>8.2f} {row['ratio_vs_hf']:>19.2f}x")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"megabytes": megabytes, "threads": threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
