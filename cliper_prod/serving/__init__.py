"""Serving stage: a bundle behind HTTP: the API (``api``, ``service``, ``middleware``,
``metrics``) on Ray Serve (``app``, ``cliper-prod[ray]``)."""
