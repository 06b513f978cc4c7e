"""Sift's offline half: read documents, split them into passages, write a verified index bundle.

Nothing in this package imports `app`; the server only reads what this package writes.
"""

__version__ = "0.1.0"
