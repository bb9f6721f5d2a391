"""Fixtures for the model tests: a caption tokenizer trained on the spot and tiny configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bita.models.build import build_model
from bita.models.llm import train_caption_tokenizer

CONF = Path(__file__).resolve().parents[2] / "conf"

CAPTIONS = [
    "many cars are parked in a parking lot near a building",
    "a river runs through green fields and some trees",
    "several white buildings stand beside a wide road",
    "an airport with two planes and a long runway",
    "a baseball field is surrounded by green trees",
    "many storage tanks are near a port with boats",
]


def compose_sections(encoder: str, qformer: str, llm: str) -> DictConfig:
    """The model sections as `python -m bita.run encoder=… qformer=… llm=…` composes them."""
    root = OmegaConf.load(CONF / "config.yaml")
    return OmegaConf.create(
        {
            "encoder": OmegaConf.load(CONF / "encoder" / f"{encoder}.yaml"),
            "qformer": OmegaConf.load(CONF / "qformer" / f"{qformer}.yaml"),
            "llm": OmegaConf.load(CONF / "llm" / f"{llm}.yaml"),
            "model": root.model,
        }
    )


@pytest.fixture(scope="session")
def compose():
    """compose(encoder, qformer, llm) → the model config sections for those options."""
    return compose_sections


@pytest.fixture(scope="session")
def caption_tokenizer(tmp_path_factory) -> Path:
    return train_caption_tokenizer(CAPTIONS * 4, 320, tmp_path_factory.mktemp("caption_tok"))


@pytest.fixture
def tiny_cfg(caption_tokenizer) -> DictConfig:
    cfg = compose_sections("tiny", "tiny", "tiny")
    cfg.llm.tokenizer = str(caption_tokenizer)
    return cfg


@pytest.fixture
def tiny_model(tiny_cfg):
    return build_model(tiny_cfg)


def _image_tensor(path: Path, preprocess) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((preprocess.size,) * 2, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(preprocess.mean), torch.tensor(preprocess.std)
    return ((x - mean[:, None, None]) / std[:, None, None])[None]


@pytest.fixture(scope="session")
def image_tensor():
    """image_tensor(path, preprocess) → [1, 3, size, size] normalised as the tower expects."""
    return _image_tensor
