"""Serving stage: a bundle behind HTTP, one API (``api``, ``service``) on two engines: uvicorn
worker processes (``local``, ``cliper-prod[serve]``) or Ray Serve (``app``, ``cliper-prod[ray]``)."""
