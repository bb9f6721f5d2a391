"""The paper preset builds offline with random weights, in the form the README gives."""

import hashlib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bita.locations import resolve_location
from bita.models.build import build_model, count_parameters

REPO = Path(__file__).resolve().parents[2]
# the README's offline form of the paper preset (README "Model"), checked to be there verbatim
OFFLINE_RANDOM = (
    "encoder.pretrained=null qformer.init_from=null llm.pretrained=null llm.tokenizer=standin"
)
BERT_BASE_UNCASED_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"  # its published vocab.txt


def paper_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=paper_pretrain2", *overrides])
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def test_readme_gives_the_offline_form():
    assert OFFLINE_RANDOM in (REPO / "README.md").read_text()


def test_paper_preset_builds_offline_at_full_size_with_random_weights():
    """Builds BITA as a stage would (tokenizers included) on the meta device: full size, no
    memory. HF_HUB_OFFLINE is set for the suite, so any download fails. Fails where the paper
    preset still fetches the bert-base-uncased or facebook/opt-2.7b tokenizer."""
    cfg = paper_config(*OFFLINE_RANDOM.split())
    with torch.device("meta"):
        model = build_model(cfg)
    counts = count_parameters(cfg)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert numel(model.encoder) == counts["encoder"]
    assert numel(model.llm.model) == counts["llm"]
    assert model.llm.model.get_input_embeddings().num_embeddings == 50272  # OPT-2.7B's table
    assert model.ift.embeddings.word.num_embeddings == 30522 + 1  # BERT's vocabulary + [DEC]
    ids = model.ift_tokenizer("many cars are parked").input_ids
    assert ids[0] == model.ift_tokenizer.cls_token_id and len(ids) == 6


def test_the_paper_ift_tokenizer_is_bert_base_uncased():
    """The IFT's tokenizer comes from a pip package: it must be bert-base-uncased's own
    WordPiece vocabulary and settings (lower-casing, accents as BERT's normaliser does)."""
    cfg = paper_config()
    folder = Path(resolve_location(cfg.qformer.tokenizer))
    assert hashlib.md5((folder / "vocab.txt").read_bytes()).hexdigest() == (
        BERT_BASE_UNCASED_VOCAB_MD5
    )
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(folder)
    normalizer = bert.backend_tokenizer.normalizer.__getstate__()
    assert b'"lowercase":true' in normalizer and b'"strip_accents":null' in normalizer
    assert bert.tokenize("Many CARS café") == ["many", "cars", "cafe"]


def test_standin_tokenizer_refuses_pretrained_weights(compose):
    from bita.models.llm import build_prefix_lm

    cfg = compose("tiny", "tiny", "opt_2.7b").llm
    cfg.tokenizer = "standin"
    with pytest.raises(ValueError, match="llm.tokenizer=standin goes only with random weights"):
        build_prefix_lm(cfg)


@pytest.mark.slow
def test_paper_preset_builds_for_real_and_captions_with_random_weights():
    """The documented offline form, materialised: ViT-L/14 (21 blocks, bf16), IFT-base and
    OPT-2.7B (bf16, ~5.3 GB) with random weights on the CPU, one ITC loss and a short caption.
    Slow and memory-hungry (about 7 GB)."""
    cfg = paper_config(*OFFLINE_RANDOM.split())
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.image_tokens(images)
        assert tokens.shape == (2, 257, 1024)
        assert torch.isfinite(model.itc_loss(tokens, ["a road", "a river"])["loss"])
        captions = model.generate(tokens[:1], num_beams=1, max_new_tokens=2, min_new_tokens=1)
    assert len(captions) == 1 and isinstance(captions[0], str)
