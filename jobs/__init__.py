"""Offline batch inference: a dataset through a model, into parquet (``inferoxy batch``), and the jobs that run it
for the REST API (``POST /v2/jobs``, the ``job_worker`` component). docs/JOBS.md."""
