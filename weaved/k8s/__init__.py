"""weaved in a Kubernetes cluster: the API client, Node discovery, reclaim and the CNI install step.

The decisions are pure and live in :mod:`weaved.core.kube`; the modules here only do the HTTP and the files.
"""
