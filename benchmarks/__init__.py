"""Benchmarks of the RAIN engine (run as modules: ``python -m benchmarks.speed``)."""
