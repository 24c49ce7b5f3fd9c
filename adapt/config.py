"""What the adaptation loop is configured with: its own small object, filled by the server from
its settings (``server.settings.AdaptSettings`` extends it with what only the server reads)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AdaptConfig(BaseModel):
    """Continual adaptation: uncertain queries -> synthesized examples -> LoRA -> gate -> swap."""

    tenants: list[str] = Field(default_factory=list)  # opt-in; ["*"] for every tenant
    shared: bool = False  # adapters serve every tenant, not only the one whose data trained them
    base_model_path: str | None = None  # HF folder of the served base (set by the embedded backend)
    uncertainty_threshold: float = 0.5  # queue requests at least this unsure
    dedup_similarity: float = 0.9
    queue_trigger: int = 16  # start a cycle once a tenant has this many pending queries
    period_s: float | None = None  # or on a period
    max_queries: int = 32  # uncertain queries used by one cycle
    siblings: int = 3  # similar new queries the model writes per uncertain query
    bon_n: int = 4  # candidates per training question (best_of_n)
    verifiers: list[str] = Field(default_factory=lambda: ["approval", "agreement"])
    min_verifier_score: float = 0.5  # keep only examples the verifiers approve this much
    teacher_model: str | None = None
    holdout_fraction: float = 0.25
    rank: int = 8
    alpha: int = 16
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = 1e-3
    epochs: int = 3
    max_steps: int = 60
    batch_size: int = 4
    threads: int = 1  # torch threads for the trainer process (serving keeps the rest)
    gate_margin: float = 0.05  # promote only if the new adapter beats the current by this much
    rollback_window: int = 20  # live requests watched after a promotion
    rollback_drop: float = 0.15  # roll back if live confidence drops this much below the gate's
