"""Benchmark experiments built on ntkit (UCI-90 of Arora et al. 2020)."""
