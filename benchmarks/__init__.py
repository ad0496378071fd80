"""Speed benchmarks of the MoE families against dense models of equal activated FLOPs.

Run `python -m benchmarks.run --help`; see BENCHMARKS.md for the protocol and the recorded numbers.
"""
