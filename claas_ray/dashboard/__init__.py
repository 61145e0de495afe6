"""The dashboard: one server-rendered page of adapters, feedback and evaluation results."""
