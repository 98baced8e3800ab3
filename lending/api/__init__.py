"""The HTTP API: the front door beside the workers."""
