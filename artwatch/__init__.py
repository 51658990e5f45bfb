"""The composition root: the command line and the wiring of every command.

Stands above infra, models, streams and alerts (it may import all four; none imports it).
"""
