"""Running trials and workers: the study driver (`study`), the trial function (`trial`), the loop
of one worker (`loop`) and the shared budget it claims trials from (`budget`), worker processes
(`workers`), the task and its baseline (`workload`), MLflow logging (`tracking`), threads and
progress bars.

Imports `search.config`; never `search.results`.
"""
