"""Delivery: what happens to the outbox's rows between the store and the sinks.

`policy` decides (pure functions of an attempt's outcome and a sink's schedule), `lane` holds one
sink's queue state, `recorder` writes outcomes to the store, `dispatcher` runs the lanes.
"""
