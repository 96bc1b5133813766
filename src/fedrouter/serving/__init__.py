"""``fedrouter serve``: an OpenAI-compatible server that routes every request to a trained run's adapters.

``engine`` batches requests on the one loaded model, ``api`` is the HTTP layer and the playground page.
"""
