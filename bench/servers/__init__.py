"""Benchmark servers: one per target, all serving the same broadcast routes."""
