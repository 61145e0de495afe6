"""Wire shapes: the OpenAI-compatible API, the CLaaS API, and the router <-> inference messages."""
