"""Prometheus text for `GET /metrics`: requests, KV-cache blocks, prefix-cache hits, tokens, time to first token.

Names follow vLLM's where one exists (`vllm:num_requests_running` → `gptwo_requests_running`, ...), in
the text exposition format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

GAUGES = {
    "requests_running": "Sequences running (decoding or being prefilled).",
    "requests_waiting": "Sequences waiting for a place.",
    "kv_blocks_used": "KV-cache blocks held by running sequences.",
    "kv_blocks_total": "KV-cache blocks in all.",
    "kv_block_size": "Tokens per KV-cache block.",
    "kv_cache_bytes": "Bytes of the KV cache (keys and values, all layers).",
    "kv_blocks_touched": "KV-cache blocks ever handed out (on a CPU, the blocks whose memory is in use).",
    "kv_tokens_held": "Tokens whose keys and values running sequences hold.",
}
COUNTERS = {
    "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits_total": "Prompt tokens found in the prefix cache (not computed again).",
    "preemptions_total": "Sequences preempted for lack of KV-cache blocks (recomputed later).",
    "prompt_tokens_total": "Prompt tokens computed.",
    "generation_tokens_total": "Tokens generated.",
    "spec_decode_draft_tokens_total": "Speculative tokens proposed (gptwo serve --speculate ngram; 0 without it).",
    "spec_decode_accepted_tokens_total": "Speculative tokens accepted (acceptance rate: accepted / proposed).",
}


def prometheus_text(metrics: dict, model: str) -> str:
    """The engine's `metrics()` as Prometheus text, each sample labelled with the served model's name."""
    label = '{model_name="' + _escaped(model) + '"}'
    lines = []
    for kinds, kind in ((GAUGES, "gauge"), (COUNTERS, "counter")):
        for key, help_text in kinds.items():
            name = f"gptwo_{key}"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{label} {metrics[key]}"]
    name = "gptwo_time_to_first_token_seconds"
    lines += [f"# HELP {name} Seconds from a request's arrival to its first token.", f"# TYPE {name} histogram"]
    for bound, count in metrics["ttft_buckets"]:
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{label[:-1]},le="{le}"}} {count}')
    lines += [f"{name}_sum{label} {metrics['ttft_sum']}", f"{name}_count{label} {metrics['ttft_count']}"]
    if metrics.get("adapter_requests"):  # gptwo serve --adapter: requests per LoRA adapter (vLLM labels them too)
        name = "gptwo_lora_requests_total"
        lines += [f"# HELP {name} Requests that asked for each LoRA adapter.", f"# TYPE {name} counter"]
        for adapter, count in metrics["adapter_requests"].items():
            lines.append(f'{name}{label[:-1]},lora_name="{_escaped(adapter)}"}} {count}')
    return "\n".join(lines) + "\n"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
