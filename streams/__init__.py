"""Streams: the Faust app, topics, wire records, agents, sinks glue and replay.

Imported only by the command line; builds on infra (and later models, alerts).
"""
