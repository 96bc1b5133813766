"""Serving a trained run: its router artifact, the router, and ``fedrouter serve``.

``artifact`` is what a run saves (adapters, centroids, settings) and loads back validated; ``router`` loads it onto
the base model and answers prompts, each with the adapter it routes to; ``options`` holds every serve limit,
``engine`` batches requests on the one loaded model, ``api`` is the OpenAI-compatible HTTP layer and the
playground page, ``gateway`` the vLLM gateway.
"""
