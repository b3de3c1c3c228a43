"""Evaluation: metrics as pure functions, per-case evaluation, the summary format, the HTML report."""
