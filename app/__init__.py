"""Sift's online half: the retrieval stages, the pipeline that wires them, and the HTTP API."""
