"""The ``virtbus`` command line: a virsh for the cluster, talking only to the bus."""
