"""virtbus: libvirt for a whole cluster, spoken over a message bus."""

__version__ = "0.1.0"
