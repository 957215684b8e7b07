"""Data: text sources → token shards → batches for training."""
