"""Bad input to `gptwo webtext`: each case is one line `error: <what, naming the file> — <fix>`,
exit 2, and nothing already written is lost; bad records inside a good dump are counted and skipped."""

import json
import random
import re

import pytest
import zstandard
from webtext_site import submission, write_dump

from gptwo.cli import main
from gptwo.webtext.crawlstate import CrawlState, PageResult, open_crawl_dir
from gptwo.webtext.records import read_jsonl, write_jsonl

FAST_FLAGS = [
    "--allow-private-addresses",
    "--timeout",
    "1",
    "--retries",
    "0",
    "--workers",
    "1",
    "--partitions",
    "2",
    "--min-tokens",
    "10",
]


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and " — " in err, err
    assert "--debug" not in err, err  # not the catch-all for bugs
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def dump_bytes(n: int) -> bytes:
    rng = random.Random(0)
    posts = [
        submission(
            f"https://site{i}.example.com/story/{rng.getrandbits(64):x}",
            5 + i % 7,
            title=" ".join(rng.choice(["cats", "news", "rust", "space", "tea"]) for _ in range(12)),
        )
        for i in range(n)
    ]
    return "".join(json.dumps(p) + "\n" for p in posts).encode()


def streamed_zst(data: bytes) -> bytes:
    """zstd as Pushshift writes it: a streamed frame of many blocks."""
    out = zstandard.ZstdCompressor(level=3).compressobj()
    return out.compress(data) + out.flush()


def test_truncated_zst_dump_names_the_file_and_the_records_read_before_the_cut(tmp_path, capsys):
    data = dump_bytes(4000)
    whole = streamed_zst(data)
    dump = tmp_path / "RS_2019-03.zst"
    dump.write_bytes(whole[: len(whole) * 6 // 10])
    out = tmp_path / "urls.ndjson.zst"
    assert main(["webtext", "urls", str(dump), "--out", str(out), "--workers", "1"]) == 2
    err = one_line_error(capsys, dump, "ends mid-frame", "truncated")
    # Oracle: the complete lines zstd can decode from the cut file are exactly the records read.
    decodable = zstandard.ZstdDecompressor().decompressobj().decompress(dump.read_bytes())
    read = int(re.search(r"; (\d+) records were read before", err).group(1))
    assert 0 < read == decodable.count(b"\n") < 4000
    assert not out.exists()

    dump.write_bytes(whole)  # the whole file reads, and so does a file of several frames
    assert main(["webtext", "urls", str(dump), "--out", str(out), "--workers", "1"]) == 0
    half = data.index(b"\n", len(data) // 2) + 1
    dump.write_bytes(streamed_zst(data[:half]) + streamed_zst(data[half:]))
    assert main(["webtext", "urls", str(dump), "--out", str(out), "--workers", "1"]) == 0
    assert len(list(read_jsonl(out))) == 4000


def file_of(name: str, data: bytes):
    """A maker of the bad input `name` holding `data`."""

    def make(folder):
        (folder / name).write_bytes(data)
        return folder / name

    return make


def make_folder(folder):
    (folder / "dumps").mkdir()
    return folder / "dumps"


BAD_INPUTS = {
    # name: (make the input in tmp_path -> its path, words the error must contain)
    "random bytes as .zst": (file_of("RS.zst", random.Random(1).randbytes(5000)), ["not a zstd file"]),
    "zstd magic, then junk": (file_of("RS.zst", b"\x28\xb5\x2f\xfd" + bytes(range(200))), ["not a valid zstd stream"]),
    "empty dump": (file_of("RS.zst", b""), ["is empty"]),
    "folder as dump": (make_folder, ["is a folder"]),
    "binary plain file": (file_of("RS.jsonl", bytes(range(256)) * 8), ["binary data"]),
    "missing dump": (lambda folder: folder / "RS_typo.zst", ["not found"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
@pytest.mark.parametrize("command", ["urls", "build"])
def test_bad_dumps_are_one_line_errors(tmp_path, capsys, case, command):
    make, needles = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / ("urls.ndjson.zst" if command == "urls" else "webtext")
    assert main(["webtext", command, str(path), "--out", str(out), "--workers", "1"]) == 2
    one_line_error(capsys, path, *needles)
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_records_in_a_dump_are_counted_and_skipped(tmp_path, site_server, capsys):
    good = [submission(site_server.url(f"/article/{i}"), 5 + i) for i in range(3)]
    good.append(submission(site_server.url("/article/3"), 9, id=10**30, title="caf\ud800e"))  # huge id, lone surrogate
    bad = [
        submission(site_server.url("/dup/exact"), 20) | {field: value}
        for field, value in [
            ("score", 10**40),
            ("score", "abc"),
            ("score", True),
            ("score", {"up": 4}),
            ("title", ["a", "b"]),
            ("subreddit", 5),
        ]
    ]
    lines = [json.dumps(p) for p in good + bad]
    lines += [
        f'{{"url": "{site_server.url("/dup/near")}", "score": 1e308}}',
        f'{{"url": "{site_server.url("/short")}", "score": 1e999}}',
        f'{{"url": "{site_server.url("/empty")}", "score": NaN}}',
        '{"url": "http://a.example.com/\\udc00", "score": 7}',
        "[]",
    ]
    dump = tmp_path / "RS_2019-04.jsonl"
    write_dump(dump, lines)
    out = tmp_path / "webtext"
    assert main(["webtext", "build", str(dump), "--out", str(out), *FAST_FLAGS]) == 0
    report = json.loads((out / "report.json").read_text())["stages"]
    assert report["urls"] == {"in": 15, "kept": 4, "dropped": {"bad_url": 1, "malformed": 10}}
    assert report["fetch"]["kept"] == 4
    titles = {d["url"]: d["title"] for d in read_jsonl(out / "documents.jsonl.zst")}
    assert titles[site_server.url("/article/3")] == "caf\ufffde"


def test_damaged_build_folder_on_rerun(tmp_path, site_server, capsys):
    dump = tmp_path / "RS.jsonl"
    write_dump(dump, [submission(site_server.url(f"/article/{i}"), 5) for i in range(4)])
    out = tmp_path / "webtext"
    assert main(["webtext", "build", str(dump), "--out", str(out), *FAST_FLAGS]) == 0
    capsys.readouterr()
    written = {p: p.read_bytes() for p in (out / "documents.jsonl.zst", out / "report.json")}
    served = site_server.requests.copy()

    def rerun() -> int:
        code = main(["webtext", "build", str(dump), "--out", str(out), *FAST_FLAGS])
        if code == 0:
            capsys.readouterr()
        return code

    meta = out / "crawl" / "crawl.json"
    kept_meta = meta.read_bytes()
    for junk in (b"\x00garbage", b"[]", b'{"format": "gptwo-webtext-crawl", "partitions": 0}'):
        meta.write_bytes(junk)
        assert rerun() == 2
        one_line_error(capsys, meta, "damaged", "restore it", "2 part-*.sqlite")
    meta.write_bytes(kept_meta)

    db = out / "crawl" / "part-00000.sqlite"
    db.write_bytes(b"this is not a database " * 200)
    assert rerun() == 2
    one_line_error(capsys, db, "damaged", "delete part-00000.sqlite")
    assert db.read_bytes() == b"this is not a database " * 200  # left for the user to restore
    assert (
        main(["webtext", "extract", str(out / "crawl"), "--out", str(tmp_path / "d.jsonl.zst"), "--min-tokens", "10"])
        == 2
    )
    one_line_error(capsys, db)
    assert {p: p.read_bytes() for p in written} == written and site_server.requests == served

    # The fix it names works: that partition is fetched again, and the corpus is the same.
    db.unlink()
    assert rerun() == 0
    assert (out / "documents.jsonl.zst").read_bytes() == written[out / "documents.jsonl.zst"]
    refetched = site_server.requests - served
    assert 0 < sum(refetched.values()) <= 5

    # Files that only save work on a rerun are recomputed when damaged.
    for cache in (out / "urls.report.json", out / "extract" / "part-00000.report.json"):
        cache.write_text("{not json")
        assert rerun() == 0
        assert (out / "documents.jsonl.zst").read_bytes() == written[out / "documents.jsonl.zst"]
    signatures = out / "extract" / "part-00001.minhash.npy"
    signatures.write_bytes(b"junk")
    assert rerun() == 2
    one_line_error(capsys, signatures, "delete")
    signatures.unlink()
    assert rerun() == 0

    # A dump cut short since the last run: the error, and the finished build left as it was.
    whole = dump.read_bytes()
    dump.with_suffix(".zst").write_bytes(streamed_zst(whole)[:-5])
    dump.unlink()
    dump = dump.with_suffix(".zst")
    assert rerun() == 2
    one_line_error(capsys, dump, "mid-frame")
    assert (out / "documents.jsonl.zst").read_bytes() == written[out / "documents.jsonl.zst"]


def make_url_file(path, records):
    write_jsonl(path, records)
    return path


def test_bad_url_files_crawl_folders_and_outputs(tmp_path, capsys):
    crawl = tmp_path / "crawl"
    cases = [
        # (argv, words the error must contain)
        (
            [
                "fetch",
                str(make_url_file(tmp_path / "huge.ndjson", [{"url": "http://a.example.com/", "score": 10**30}])),
                "--out",
                str(crawl),
            ],
            ["huge.ndjson", "record 1", "64-bit integer"],
        ),
        (
            [
                "fetch",
                str(make_url_file(tmp_path / "title.ndjson", [{"url": "http://a.example.com/", "title": {"x": 1}}])),
                "--out",
                str(crawl),
            ],
            ["title.ndjson", "title that is not text"],
        ),
        (
            ["fetch", str(tmp_path / "list.txt"), "--out", str(crawl)],
            ["list.txt", "line 1 is not a JSON object", "gptwo webtext urls"],
        ),
        (["fetch", str(tmp_path / "cut.ndjson.zst"), "--out", str(crawl)], ["cut.ndjson.zst", "mid-frame"]),
        (
            ["fetch", "/proc/self/mem", "--out", str(crawl)],
            ["can't read /proc/self/mem"],
        ),  # a file whose read fails (EIO)
        (
            ["fetch", str(make_url_file(tmp_path / "ok.ndjson", [])), "--out", str(tmp_path / "list.txt")],
            ["list.txt", "is a file"],
        ),
        (["fetch", str(tmp_path / "ok.ndjson"), "--out", str(crawl), "--resolve", "a.example.com"], ["HOST=ADDRESS"]),
        (
            ["fetch", str(tmp_path / "ok.ndjson"), "--out", str(crawl), "--resolve", "a.example.com=10.0.0.999"],
            ["10.0.0.999"],
        ),
        (["urls", str(tmp_path / "list.txt"), "--out", str(tmp_path)], ["is a folder"]),
        (["urls", "/proc/self/mem", "--out", str(tmp_path / "u.ndjson.zst")], ["can't read /proc/self/mem"]),
        (["extract", str(tmp_path / "old-crawl"), "--out", str(tmp_path)], ["is a folder"]),
        (["build", str(tmp_path / "list.txt"), "--out", str(tmp_path / "list.txt")], ["list.txt", "is a file"]),
    ]
    (tmp_path / "list.txt").write_text("https://a.example.com/x\nhttps://b.example.com/y\n")
    whole = streamed_zst(dump_bytes(2000))
    (tmp_path / "cut.ndjson.zst").write_bytes(whole[: len(whole) // 2])
    crawl_dir = tmp_path / "old-crawl"
    open_crawl_dir(crawl_dir, 1)
    state = CrawlState(crawl_dir / "part-00000.sqlite")
    state.record({"url": "http://a.example.com/"}, PageResult("ok", body=b"<html></html>"))
    state.close()
    for argv, needles in cases:
        assert cli(*argv, "--workers", "1") == 2, argv
        one_line_error(capsys, *needles)
    assert (tmp_path / "list.txt").read_text().startswith("https://a.example.com/x")
    assert not crawl.exists()  # no bad input got as far as creating the crawl folder


def cli(*argv: str) -> int:
    """`gptwo webtext ARGV`'s exit code, whether the parser or the command refused it."""
    try:
        return main(["webtext", *argv])
    except SystemExit as exit_info:
        return exit_info.code
