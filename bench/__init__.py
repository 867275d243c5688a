"""Benchmarks and stress tools for freshrec; each is a module run with `python -m bench.<name>`."""
