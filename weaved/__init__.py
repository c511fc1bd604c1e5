"""weaved: a Weave-Net-like overlay network for Kubernetes."""

__version__ = "0.1.0"
