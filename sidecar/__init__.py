"""trio-sidecar: the AgentCom hub worker, on Trio."""

__version__ = "0.1.0"
