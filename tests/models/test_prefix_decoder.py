"""The project's decoding loop (`decode.beam_loop=bita`) must write transformers' captions: same
logits from the shared-prefix decoder, same beam rules, the same draws under the same random
state, for every OPT layout we build."""

import copy

import pytest
import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from bita.eval.decoding import DecodeSettings
from bita.models.beam_search import BeamRules
from bita.models.llm import PrefixLM
from bita.models.prefix_decoder import PrefixDecoder
from bita.models.sampling import SampleRules

END_BIAS = 4  # about half the captions end before their token limit
# post-norm layers (as OPT-350m) and a narrower word embedding projected in and out (same)


LAYOUTS = {
    "pre-norm": {},
    "post-norm, projected embeddings": {"do_layer_norm_before": False, "word_embed_proj_dim": 32},
}


def opt_lm(tokenizer_dir, head_scale: float = 1.0, end_bias: float = 0.0, **layout) -> PrefixLM:
    """A seeded 2-layer OPT with our caption tokenizer; `head_scale` sharpens its next-token
    distributions and `end_bias` raises the end token's logit, so that captions end at
    different lengths."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **layout,
    )
    model = OPTForCausalLM(config).eval()
    lm = PrefixLM(model, tokenizer)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight * head_scale)
        model.lm_head.bias.zero_()[lm.caption_end_id] = end_bias
    return lm


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_prefill_gives_the_lm_logits(caption_tokenizer, layout):
    lm = opt_lm(caption_tokenizer, **layout)
    embeds = torch.randn(3, 7, lm.model.get_input_embeddings().embedding_dim)
    decoder = PrefixDecoder(lm.model, batch=3, beams=2, prefix_len=7, new_tokens=4)
    expected = lm.model(inputs_embeds=embeds).logits[:, -1]
    torch.testing.assert_close(decoder.prefill(embeds), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_bita_beam_loop_writes_the_transformers_captions(caption_tokenizer, layout):
    lm = opt_lm(caption_tokenizer, head_scale=4.0, end_bias=END_BIAS, **layout)
    searches = [
        {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 0},
        {"num_beams": 5, "max_new_tokens": 12, "min_new_tokens": 2, "length_penalty": 0.6},
        {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 6, "length_penalty": 1.5},
        {"num_beams": 4, "max_new_tokens": 10, "min_new_tokens": 1, "num_return_sequences": 4},
    ]
    ended_early = []
    for seed in range(6):
        prefix = torch.randn(4, 3, lm.hidden_size, generator=torch.Generator().manual_seed(seed))
        for search in searches:
            ours = lm.generate(prefix, "a photo of ", beam_loop="bita", **search)
            theirs = lm.generate(prefix, "a photo of ", beam_loop="transformers", **search)
            assert ours == theirs, (seed, search)
            if "num_return_sequences" not in search:  # an image's n best: ordered alike too
                limit = search["max_new_tokens"]
                ended_early += [len(lm.tokenizer(t).input_ids) < limit for t in ours]
    # the finishing rules were exercised: many captions ended before the token limit, not all
    assert 0.2 < sum(ended_early) / len(ended_early) < 0.8


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_bita_sampling_draws_the_transformers_samples(caption_tokenizer, layout):
    lm = opt_lm(caption_tokenizer, head_scale=2.0, end_bias=END_BIAS, **layout)
    prefix = torch.randn(3, 3, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    draws = [
        {"num_samples": 5, "max_new_tokens": 10, "min_new_tokens": 2},
        {"num_samples": 3, "max_new_tokens": 8, "min_new_tokens": 0, "temperature": 0.7},
    ]
    for seed in range(4):
        for draw in draws:
            torch.manual_seed(seed)
            ours = lm.sample(prefix, "a photo of ", **draw)
            torch.manual_seed(seed)
            theirs = lm.generate(
                prefix,
                "a photo of ",
                beam_loop="transformers",
                do_sample=True,
                num_beams=1,
                top_k=0,
                top_p=1.0,
                num_return_sequences=draw["num_samples"],
                temperature=draw.get("temperature", 1.0),
                max_new_tokens=draw["max_new_tokens"],
                min_new_tokens=draw["min_new_tokens"],
            )
            assert ours.texts == theirs, (seed, draw)
            assert len(set(ours.texts)) > 1
            for ids, text in zip(ours.token_ids, ours.texts, strict=True):  # ids as drawn
                assert lm.tokenizer.decode(ids, skip_special_tokens=True).strip() == text


def test_only_plain_beam_search_and_full_sampling_take_the_bita_loop():
    beam = {"num_beams": 5, "max_new_tokens": 9}
    assert BeamRules.apply_to(beam)
    assert not BeamRules.apply_to({**beam, "num_beams": 1})
    assert not BeamRules.apply_to({**beam, "do_sample": True})
    assert not BeamRules.apply_to({**beam, "repetition_penalty": 2})
    assert BeamRules.apply_to({**beam, "num_return_sequences": 5})
    assert not BeamRules.apply_to({**beam, "num_return_sequences": 6})
    draw = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": 9}
    assert SampleRules.apply_to(draw)
    assert not SampleRules.apply_to({**draw, "top_p": 0.9})
    assert not SampleRules.apply_to({key: v for key, v in draw.items() if key != "top_k"})
    assert not SampleRules.apply_to({**draw, "num_beams": 3})


def test_unknown_beam_loop_is_refused_by_name(caption_tokenizer):
    with pytest.raises(ValueError, match="decode.beam_loop='fast'"):
        DecodeSettings(beam_loop="fast")
    lm = opt_lm(caption_tokenizer)
    with pytest.raises(ValueError, match="decode.beam_loop='fast'"):
        lm.generate(torch.randn(1, 2, lm.hidden_size), beam_loop="fast", num_beams=2)


def test_a_copied_lm_builds_its_own_decoder_and_training_frees_it(caption_tokenizer):
    lm = opt_lm(caption_tokenizer)
    prefix = torch.randn(2, 3, lm.hidden_size)
    search = {"num_beams": 2, "max_new_tokens": 4}
    first = lm.generate(prefix, **search)
    twin = copy.deepcopy(lm)
    assert twin._decoders.entries == {} and len(lm._decoders.entries) == 1
    assert twin.generate(prefix, **search) == first
    lm.train()  # back to training frees the decoding buffers
    assert lm._decoders.entries == {}


def test_a_moved_lm_gets_a_new_decoder(caption_tokenizer):
    """Buffers (and on CUDA, graphs) belong to the weights they were built for."""
    lm = opt_lm(caption_tokenizer)
    prefix = torch.randn(2, 3, lm.hidden_size)
    search = {"num_beams": 2, "max_new_tokens": 4}
    lm.generate(prefix, **search)
    lm.model.to(torch.bfloat16)
    assert len(lm.generate(prefix, **search)) == 2
    (decoder, _), (moved, _) = lm._decoders.entries.values()
    assert (
        decoder.prefix_cache.dtype == torch.float32 and moved.prefix_cache.dtype == torch.bfloat16
    )


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_padded_prefill_gives_each_rows_own_logits(caption_tokenizer, layout):
    """Left padding with a mask: each row's logits are those of its real tokens alone."""
    lm = opt_lm(caption_tokenizer, **layout)
    hidden = lm.model.get_input_embeddings().embedding_dim
    rows = [torch.randn(n, hidden) for n in (7, 4, 5)]
    embeds = torch.stack([torch.cat([torch.randn(7 - len(r), hidden), r]) for r in rows])
    mask = torch.tensor([[0] * (7 - len(r)) + [1] * len(r) for r in rows])
    decoder = PrefixDecoder(lm.model, batch=3, beams=2, prefix_len=7, new_tokens=4, padded=True)
    logits = decoder.prefill(embeds, mask)
    for row, real in zip(logits, rows, strict=True):
        expected = lm.model(inputs_embeds=real[None]).logits[0, -1]
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_both_loops_write_the_same_captions_after_per_image_contexts(caption_tokenizer, layout):
    """Retrieved captions make each image's prompt a different length: the project's loop
    (padded shared-prefix cache) and transformers' (attention mask) still agree, for beams
    and samples, and a caption does not depend on the other images of its batch."""
    lm = opt_lm(caption_tokenizer, head_scale=4.0, end_bias=END_BIAS, **layout)
    retrieved = [["many cars are parked"], [], ["a river runs through", "trees"], ["a road"]]
    contexts = lm.context_ids(retrieved, max_tokens=6)
    search = {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 1}
    changed = 0
    for seed in range(4):
        prefix = torch.randn(4, 3, lm.hidden_size, generator=torch.Generator().manual_seed(seed))
        ours = lm.generate(prefix, "a photo of ", contexts=contexts, **search)
        theirs = lm.generate(
            prefix, "a photo of ", beam_loop="transformers", contexts=contexts, **search
        )
        assert ours == theirs, seed
        alone = [  # padded further, to a fixed context width
            lm.generate(prefix[i : i + 1], "a photo of ", contexts=[c], context_width=20, **search)
            for i, c in enumerate(contexts)
        ]
        alone = [caption for (caption,) in alone]
        assert ours == alone, seed
        plain = lm.generate(prefix, "a photo of ", **search)
        changed += sum(a != b for a, b in zip(ours, plain, strict=True))
        draw = {"num_samples": 3, "max_new_tokens": 8, "min_new_tokens": 1}
        torch.manual_seed(seed)
        samples = lm.sample(prefix, "a photo of ", contexts=contexts, **draw)
        torch.manual_seed(seed)
        reference = lm.sample(
            prefix, "a photo of ", contexts=contexts, beam_loop="transformers", **draw
        )
        assert samples == reference, seed
    assert changed > 0  # the contexts are read


def test_batches_padded_to_one_context_width_share_one_decoder(caption_tokenizer):
    """Retrieved contexts differ in length batch to batch; padded to the widest possible, every
    batch has one shape, so the decoder (and on CUDA its graphs) is built once."""
    lm = opt_lm(caption_tokenizer)
    prefix = torch.randn(2, 3, lm.hidden_size)
    search = {"num_beams": 2, "max_new_tokens": 4}
    for retrieved in ([["a river"], ["trees"]], [["many cars are parked"], []]):
        contexts = lm.context_ids(retrieved, max_tokens=5)
        lm.generate(prefix, "a photo of ", contexts=contexts, context_width=6, **search)
    assert len(lm._decoders.entries) == 1
