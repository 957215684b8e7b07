"""ShardLoader: sequential batches, rank slicing equal to gradient accumulation, exact resume, errors."""

import json

import numpy as np
import pytest
import torch

from gptwo.data.loader import ShardLoader, read_meta
from gptwo.data.shards import write_shard
from gptwo.errors import GptwoError

B, T = 2, 4


def make_data(folder, sizes=(37, 0, 50), val=(20,), identity="gpt2"):
    """A prepared-style folder whose train stream is 0, 1, 2, ... spread over shards of `sizes` tokens."""
    folder.mkdir(exist_ok=True)
    meta = {"tokenizer": identity, "n_vocab": 50257, "eot_token": 50256, "dtype": "uint16", "splits": {}}
    for split, counts in (("train", sizes), ("val", val)):
        start, shards = (0 if split == "train" else 1000), []
        for i, n in enumerate(counts):
            name = f"{split}_{i:06d}.bin"
            write_shard(str(folder / name), np.arange(start, start + n), identity, dtype=np.uint16)
            shards.append({"file": name, "tokens": n})
            start += n
        meta["splits"][split] = {"shards": shards, "tokens": sum(counts)}
    meta["train_tokens"], meta["val_tokens"] = sum(sizes), sum(val)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_batches_are_sequential_across_shards_and_wrap(tmp_path):
    loader = ShardLoader(str(make_data(tmp_path / "d")), batch_size=B, block_size=T)
    assert (loader.tokenizer_identity, loader.n_vocab, loader.eot_token, loader.num_tokens) == (
        "gpt2",
        50257,
        50256,
        87,
    )
    x, y = loader.next_batch()
    assert x.dtype == torch.long and x.shape == (B, T)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(y, x + 1)
    firsts = [loader.next_batch()[0][0, 0].item() for _ in range(12)]
    assert firsts[:9] == [8 * k for k in range(1, 10)]  # 10 slots of 8 fit in 86 tokens; 32..40 crosses shard 0 -> 2
    assert loader.epoch == 1 and firsts[9] <= 6  # new epoch at a seeded offset below the slack of 6 tokens
    for _ in range(30):
        x, y = loader.next_batch()
        assert torch.equal(y, x + 1) and x.max() < 87


def test_ranks_together_read_what_one_process_reads_with_accumulation(tmp_path):
    data = str(make_data(tmp_path / "d"))
    single = ShardLoader(data, batch_size=B, block_size=T)
    ranks = [ShardLoader(data, batch_size=B, block_size=T, rank=r, world_size=2) for r in range(2)]
    for _step in range(25):  # crosses epoch boundaries too
        for rank in ranks:  # micro-batch k of the single process == rank k
            x1, y1 = single.next_batch()
            x2, y2 = rank.next_batch()
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_world_size_two_with_accumulation(tmp_path):
    """1 process with accumulation 4 reads the same set per step as 2 processes with accumulation 2."""
    data = str(make_data(tmp_path / "d"))
    single = ShardLoader(data, batch_size=B, block_size=T)
    ranks = [ShardLoader(data, batch_size=B, block_size=T, rank=r, world_size=2) for r in range(2)]
    for _step in range(10):
        one = sorted(single.next_batch()[0].flatten().tolist() for _ in range(4))
        two = sorted(rank.next_batch()[0].flatten().tolist() for _ in range(2) for rank in ranks)
        assert one == two


def test_state_dict_resumes_exactly(tmp_path):
    data = str(make_data(tmp_path / "d"))
    loader = ShardLoader(data, batch_size=B, block_size=T, seed=3)
    for _ in range(13):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(20)]
    resumed = ShardLoader(data, batch_size=B, block_size=T, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, (resumed.next_batch() for _ in range(20))):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_state_moves_between_world_sizes(tmp_path):
    data = str(make_data(tmp_path / "d"))
    single = ShardLoader(data, batch_size=B, block_size=T)
    for _ in range(6):
        single.next_batch()
    rank1 = ShardLoader(data, batch_size=B, block_size=T, rank=1, world_size=2)
    rank1.load_state_dict(single.state_dict())
    single.next_batch()
    assert torch.equal(rank1.next_batch()[0], single.next_batch()[0])
    other = ShardLoader(data, batch_size=B, block_size=2 * T)
    with pytest.raises(GptwoError, match="same batch_size and block_size"):
        other.load_state_dict(single.state_dict())


def test_same_seed_same_batches_other_seed_other_epoch_offsets(tmp_path):
    data = str(make_data(tmp_path / "d", sizes=(203,)))
    runs = {seed: [ShardLoader(data, batch_size=1, block_size=10, seed=seed) for _ in range(2)] for seed in (0, 1)}
    stream = {
        seed: [[loader.next_batch()[0].tolist() for _ in range(200)] for loader in pair] for seed, pair in runs.items()
    }
    assert stream[0][0] == stream[0][1]
    assert stream[0][0] != stream[1][0]


def test_eval_batches_split_among_ranks(tmp_path):
    data = str(make_data(tmp_path / "d", val=(70,)))
    single = [x.tolist() for x, _ in ShardLoader(data, "val", batch_size=B, block_size=T).iter_eval_batches(6)]
    assert len(single) == 6 and single[0][0] == [1000, 1001, 1002, 1003]
    ranks = [
        list(ShardLoader(data, "val", batch_size=B, block_size=T, rank=r, world_size=2).iter_eval_batches(6))
        for r in range(2)
    ]
    assert [len(r) for r in ranks] == [3, 3]
    assert sorted(x.tolist() for r in ranks for x, _ in r) == sorted(single)
    assert len(list(ShardLoader(data, "val", batch_size=B, block_size=T).iter_eval_batches())) == 8  # (70-1)//8 slots


def test_llmc_folder(tmp_path):
    for name, tokens in (
        ("fw_train_000000.bin", range(40)),
        ("fw_train_000001.bin", range(40, 60)),
        ("fw_val_000000.bin", range(9)),
    ):
        header = np.zeros(256, dtype=np.int32)
        header[:3] = [20240520, 1, len(tokens)]
        (tmp_path / name).write_bytes(header.tobytes() + np.array(tokens, dtype=np.uint16).tobytes())
    meta = read_meta(str(tmp_path))
    assert (meta["format"], meta["train_tokens"], meta["val_tokens"], meta["tokenizer"]) == ("llm.c", 60, 9, "gpt2")
    loader = ShardLoader(str(tmp_path), batch_size=1, block_size=45)
    assert loader.next_batch()[0].tolist() == [list(range(45))]
    assert ShardLoader(str(tmp_path), "val", batch_size=2, block_size=4).next_batch()[1].tolist() == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
    ]


def test_errors(tmp_path):
    with pytest.raises(GptwoError, match="does not exist") as err:
        ShardLoader(str(tmp_path / "nope"))
    assert "gptwo prepare" in err.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptwoError, match="neither meta.json"):
        read_meta(str(tmp_path / "empty"))
    data = str(make_data(tmp_path / "d", val=()))
    with pytest.raises(GptwoError, match="'val' split .* is empty") as err:
        ShardLoader(data, "val", batch_size=1, block_size=4)
    assert "--val-fraction" in err.value.fix
    with pytest.raises(GptwoError, match="fewer than batch_size\\*block_size\\+1 = 89") as err:
        ShardLoader(data, batch_size=8, block_size=11)
    assert "lower batch_size or block_size" in err.value.fix
    (tmp_path / "d" / "train_000002.bin").write_bytes((tmp_path / "d" / "train_000002.bin").read_bytes()[:-2])
    with pytest.raises(GptwoError, match="train_000002.bin.*truncated"):
        ShardLoader(data, batch_size=1, block_size=4)
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(GptwoError, match="not a valid gptwo meta"):
        ShardLoader(data)
