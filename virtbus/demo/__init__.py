"""`virtbus demo`: the composition root (agents, drivers and scheduler in one command).

The only package under virtbus/ allowed to import agent, drivers and scheduler; nothing
imports it statically (the CLI loads virtbus.demo.main by name when `demo` runs).
"""
