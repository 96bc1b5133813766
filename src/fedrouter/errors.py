"""The errors a user can cause, each with a message that names the file, line or setting at fault.

They live in one light module so that the command line can report them without importing torch.
"""


class FedRouterError(ValueError):
    """Base of every error caused by input (settings, data, model names, artifacts, peers' messages)."""


class ConfigError(FedRouterError):
    """A setting is unknown, of the wrong type or out of range."""


class DataError(FedRouterError):
    """Input data is malformed or cannot be split as configured."""


class ModelError(FedRouterError):
    """A model name or path that cannot be loaded."""


class ClusteringError(FedRouterError):
    """Too few points for the requested clusters, or points that are not finite."""


class ArtifactError(FedRouterError):
    """A router folder is missing a file or holds inconsistent values."""


class ReplyError(FedRouterError):
    """A message's content is missing, mis-shaped or not finite."""


class RunError(RuntimeError):
    """A run cannot go on (too few valid client replies, or a checkpoint that does not fit)."""
