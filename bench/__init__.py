"""Benchmarks of the engine against peer WebSocket servers (run as `python -m bench.NAME`)."""
