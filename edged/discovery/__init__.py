"""Discovery sources: each one replaces its own part of the registry (manifests, registrations, later mDNS, MQTT)."""
