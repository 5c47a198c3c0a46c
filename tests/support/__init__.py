"""Helpers shared by the host and server tiers (paths of the host and the generated test models)."""
