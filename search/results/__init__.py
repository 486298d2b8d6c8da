"""Results, reuse and reports: the Pareto front (`pareto`), exporting and rerunning a trial and
loading a registered model (`reuse`), the study's report (`report`), per-layer sensitivity
(`sensitivity`), and what compression changed in a trial: bytes per layer, flipped predictions,
attribution fidelity (`explain`).

Imports `search.config` and `search.run`.
"""
