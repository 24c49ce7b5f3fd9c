"""Contextual experience replay: a durable, per-tenant memory of past tasks, recalled into the
prompt (see memory.service)."""
