"""The server's default limits, in one place that imports nothing heavy (`gptwo serve --help` shows them)."""

MAX_REQUEST_CHOICES = 128  # choices (prompts x n) in one request
MAX_CLIENT_CHOICES = 128  # choices one client (remote address) has running or waiting; half the default queue
MAX_INSPECT_TOKENS = 1024  # tokens in one /v1/inspect text (1000 measured ~8 s of scoring with a 2-layer model)
MAX_HEADER_BYTES = 32 * 1024  # a request line and headers (cookies included)
HEADER_TIMEOUT_S = 20.0  # for a request's line and headers to arrive
BODY_TIMEOUT_S = 60.0  # for a request's whole body to arrive
LINGER_S = 10.0  # how long a refused request's remaining bytes are read and dropped before the connection closes
KEEP_ALIVE_TIMEOUT_S = 5.0  # a keep-alive connection idle this long between requests closes (uvicorn's default)
SHUTDOWN_TIMEOUT_S = 30.0  # after SIGTERM, how long running requests may finish before they are ended
MAX_BATCHED_TOKENS = 512  # tokens one step computes (vLLM's --max-num-batched-tokens)
LONG_PREFILL_TOKENS = 32  # tokens of one prompt per step while other sequences decode (docs/serve.md: the join bench)
