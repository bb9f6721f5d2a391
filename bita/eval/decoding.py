"""Caption decoding settings (the `decode` config section) and batched generation.

One settings object is shared by evaluation, fine-tune validation and the caption command so
that every caption the project reports is produced the same way (SPEC §3 defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bita.errors import ConfigError
from bita.models.bita import RERANKS
from bita.models.llm import BEAM_LOOPS
from bita.models.trainable import eval_mode


@dataclass(frozen=True)
class DecodeSettings:
    """Beam search as in SPEC §3 by default; sampling knobs for those who want them."""

    prompt: str = "a photo of "
    num_beams: int = 5
    max_new_tokens: int = 22
    min_new_tokens: int = 5
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    beam_loop: str = "bita"
    cuda_graph: bool = True
    rerank: str = "none"
    rerank_neighbours: int = 40
    rerank_sharpness: float = 0.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        checks = {
            "num_beams": self.num_beams >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty > 0,
            "top_p": 0 < self.top_p <= 1,
            "temperature": self.temperature > 0,
            "batch_size": self.batch_size >= 1,
            "beam_loop": self.beam_loop in BEAM_LOOPS,
            "rerank": self.rerank in RERANKS and (self.rerank == "none" or self.num_beams > 1),
            "rerank_neighbours": self.rerank_neighbours >= 1,
            "rerank_sharpness": self.rerank_sharpness == 0
            or (self.rerank_sharpness > 0 and self.rerank == "mbr"),
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            raise ConfigError(
                f"decode.{wrong[0]}={getattr(self, wrong[0])!r} is invalid: expected "
                "num_beams, max_new_tokens, batch_size, rerank_neighbours >= 1, "
                "0 <= min_new_tokens <= "
                "max_new_tokens, repetition_penalty > 0, 0 < top_p <= 1, temperature > 0, "
                f"beam_loop in {BEAM_LOOPS}, rerank in {RERANKS} (other than none: num_beams >= 2)"
                ", rerank_sharpness 0, or > 0 with rerank=mbr"
            )

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None = None, **overrides) -> DecodeSettings:
        """Build from the `decode` config section (DictConfig or dict) plus keyword overrides.

        ``None`` override values are ignored so command-line flags that were not given do not
        replace configured values; unknown keys are an error rather than silently unused.
        """
        values = dict(section or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"decode: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**{name: _coerce(name, value, cls) for name, value in values.items()})

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``BITA.generate`` (everything except the batch size)."""
        kwargs = dataclasses.asdict(self)
        del kwargs["batch_size"]
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, cls: type[DecodeSettings]) -> Any:
    """Accept YAML/CLI spellings (1 for 1.0) but reject values of the wrong kind."""
    expected = type(getattr(cls, name))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"decode.{name}={value!r}: expected a {expected.__name__}")
    return value


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def caption_images(
    model,
    images: torch.Tensor | None,
    settings: DecodeSettings,
    features: torch.Tensor | None = None,
    image_ids: list[str] | None = None,
) -> list[str]:
    """Captions for one batch of normalised images [B,3,H,W], or of cached tower `features`;
    a model that retrieves captions never retrieves those of `image_ids` (the images' own)."""
    device = model_device(model)
    inputs = images if features is None else features
    captions = model.caption(
        images=None if images is None else images.to(device),
        features=None if features is None else features.to(device),
        image_ids=image_ids,
        **settings.generate_kwargs(),
    )
    if len(captions) != len(inputs):
        raise RuntimeError(f"model.generate returned {len(captions)} captions for {len(inputs)}")
    return [caption.strip() for caption in captions]


def decode_batches(
    model, batches: Iterable[Mapping[str, Any]], settings: DecodeSettings
) -> Iterator[dict[str, Any]]:
    """Caption every image of eval batches; yields one record per image.

    Records keep the batch's ``image_id``, ``filename``, ``references`` and ``image_bytes``
    (for the gallery) beside the generated ``caption``. The model is put in eval mode for the
    duration and its previous mode restored, so fine-tune validation can call this mid-training.
    """
    with eval_mode(model):
        for batch in batches:
            captions = caption_images(
                model,
                batch.get("image"),
                settings,
                features=batch.get("features"),
                image_ids=batch["image_id"],
            )
            for index, caption in enumerate(captions):
                yield {
                    "image_id": batch["image_id"][index],
                    "filename": batch["filename"][index],
                    "references": list(batch["references"][index]),
                    "image_bytes": batch["image_bytes"][index],
                    "caption": caption,
                }
