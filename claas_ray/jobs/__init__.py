"""Client-side jobs that run against a running claas-ray endpoint (also as `ray job submit -- ...`)."""
