"""Scaling laws: IsoFLOP plans, sweeps of ordinary training runs, fits of L(N, D) and their plots."""
