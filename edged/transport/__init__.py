"""Transports: how a try reaches an endpoint of a tier (HTTP now; MQTT for the cloud tier comes with its issue)."""
