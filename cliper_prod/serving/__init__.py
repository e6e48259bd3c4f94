"""Serving stage: a bundle behind HTTP on Ray Serve (``cliper-prod[ray]``)."""
