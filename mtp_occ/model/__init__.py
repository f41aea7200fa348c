"""The policy: an HF causal LM with K sequential MTP layers (`mtp.py`) and its loaders (`load.py`)."""
from mtp_occ.model.mtp import MTPModel, MTPOutput

__all__ = ["MTPModel", "MTPOutput"]
