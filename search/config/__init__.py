"""What the user asked for, checked before any work: the composed Hydra config (`compose`), its
schema, the search space, objectives, constraints and early stopping, storage URLs and devices,
all gathered in a `plan.SweepPlan`.

Nothing here imports the other wings (`search.run`, `search.results`), and nothing but the space
imports torch, so a mistake in a config is reported in a second.
"""
