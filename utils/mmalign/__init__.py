"""mmalign: the library behind the course on multimodal representation alignment."""

__version__ = "0.1.0"
