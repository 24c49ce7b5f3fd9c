"""Contextual experience replay (issue: durable per-tenant memory in FAISS). Not built yet:
nothing here is imported by the server."""
