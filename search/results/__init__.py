"""Results, reuse and reports: the Pareto front (`pareto`), exporting and rerunning a trial and
loading a registered model (`reuse`), the study's report (`report`), and per-layer sensitivity
(`sensitivity`).

Imports `search.config` and `search.run`.
"""
