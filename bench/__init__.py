"""Benchmarks: Citadel side by side with the baseline a user would pick, in one run.

Each benchmark is a module run as `python -m bench.<name>`; results go to bench/results/ with
the machine they ran on. The engine and caching issues add the first ones.
"""
