"""Alert kinds: one rule per module, each producing alerts.alert.Alert records."""
