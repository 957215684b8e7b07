"""Was this text written by the model? Per-token statistics, zero-shot detectors, calibration, GLTR report,
attention maps.

The defaults live here as plain constants (no torch import), so `gptwo --help` stays fast.
"""

DEFAULT_DETECTOR = "fast_detectgpt"
DEFAULT_MIN_TOKENS = 32
MAX_TOP = 1000  # `detect --top`: alternatives kept per token
MAX_FOLDS = 100  # `detect calibrate --folds`
MAX_PASSAGES = 1_000_000  # `detect sample --limit`
