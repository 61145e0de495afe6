"""claas-ray: Continual Learning as a Service on Ray Serve."""

__version__ = "0.1.0"
