"""lending: the robotic library's book-lending service, a worker daemon on Redis Streams."""

__version__ = "0.1.0"
