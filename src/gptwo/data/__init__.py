"""Data: text sources → token shards → batches for training."""

DEFAULT_VAL_FRACTION = 0.01  # share of documents held out for validation (at least one document)
DEFAULT_SHARD_TOKENS = 100_000_000  # tokens per shard file
