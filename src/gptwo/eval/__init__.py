"""Evaluation: strided perplexity, GPT-2's zero-shot tasks, model comparison and an lm-eval plug-in.

`scoring` holds the one batched log-likelihood primitive; `perplexity`, `tasks` and `compare` build
on it; `harness` (needs lm-eval) exposes a gptwo model to lm-evaluation-harness as `--model gptwo`.
"""
