"""Serving a trained run: its router artifact, the router, and ``fedrouter serve``.

``artifact`` is what a run saves (adapters, centroids, settings) and loads back validated; ``router`` loads it onto
the base model and answers prompts, each with the adapter it routes to; ``options`` holds every serve limit,
``engine`` batches requests on the one loaded model. The OpenAI-compatible HTTP layer, in the shape of vLLM's
entrypoints: ``protocol`` (request bodies, the OpenAPI schema), ``handlers`` (one per endpoint, callable without
HTTP), ``errors`` (every error in OpenAI's shape), ``middleware`` (key, size guard, access log), ``logprobs``, and
``api``'s thin routes with the playground page; ``gateway`` is the vLLM gateway.
"""
