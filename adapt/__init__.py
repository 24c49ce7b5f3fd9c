"""Background continual adaptation (issue: uncertain queries -> LoRA -> gated hot-swap).
Not built yet: nothing here is imported by the server."""
