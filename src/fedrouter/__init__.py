"""FedRouter: task-centric personalized federated fine-tuning of language models, on Flower."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Router", "__version__"]


def __getattr__(name: str):
    # Lazy: ``import fedrouter`` stays light (no torch) until the router is used.
    if name == "Router":
        from fedrouter.serving.router import Router

        return Router
    raise AttributeError(name)
