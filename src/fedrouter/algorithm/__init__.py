"""Pure algorithm code (clustering, aggregation, routing, scheduling, metrics) on NumPy arrays.

Imports neither torch nor Flower.
"""
