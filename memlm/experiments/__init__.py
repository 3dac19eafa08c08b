"""Experiments: jobs that train several models and compare them (`memlm demo`, `memlm compare`)
and the HTML report they write. Unlike `memlm.eval`, which scores one trained model, code here
may import the trainer."""
