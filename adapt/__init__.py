"""Continual adaptation: uncertain queries -> synthesized examples -> LoRA training in its own
process -> evaluation gate -> versioned hot-swap into vLLM -> roll back (see adapt.service)."""
