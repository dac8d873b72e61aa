"""Federated full-weight rounds over MQTT (DISTREAL and its baselines) and the fleet simulator."""
