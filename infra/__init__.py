"""Infrastructure: settings, errors, metrics, database, embedded stack.

Depends on nothing else in artwatch; models, streams and alerts build on it.
"""
