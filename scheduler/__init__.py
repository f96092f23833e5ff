"""The central scheduler: cluster view, placement, live-migration coordinator, host drain.

It imports only ``virtbus``: it never touches a hypervisor, only agents over the bus.
"""
