"""Deterministic synthetic data for tests, demos and the reference models (numpy only)."""
