"""The local lab: a multi-node weaved mesh in network namespaces on this one machine."""
