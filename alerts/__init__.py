"""Alerts: the alert record, alert kinds and their rules (later: dedupe, subscriptions, delivery).

Builds on infra (and models); never imports streams.
"""
