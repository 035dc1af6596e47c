"""Tools around the runtime: evaluation, benchmarks, FLOP counts, metrics, datasets, comparisons.

They depend on the runtime core (``dereflect``), never the reverse.
"""
