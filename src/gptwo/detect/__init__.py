"""Was this text written by the model? Per-token statistics, zero-shot detectors, calibration, GLTR report, attention maps."""
