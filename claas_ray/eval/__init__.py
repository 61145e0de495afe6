"""Evaluation: does feedback teach, and what does it cost? Runs against a claas-ray endpoint."""
