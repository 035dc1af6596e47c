"""Reflection-removal methods: each module owns one method's networks, settings and sequence."""
