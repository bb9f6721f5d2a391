"""The model on a CUDA device (run by tools/gpu_check.sh): the GPU precision policy, the
feature-cache path and beam search must give what the CPU reference gives, so that a figure
measured on a GPU is a figure of the same model."""

import copy

import pytest
import torch

from bita.models.build import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CAPS = ["many cars are parked in a lot", "a river runs through fields", "white buildings", "a port"]
CUDA = torch.device("cuda")


@pytest.fixture
def pair(tiny_cfg):
    """(a seeded tiny model on the CPU in fp32, an identical copy on CUDA), both in eval mode;
    TF32 off, so that fp32 on the GPU is fp32."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield model, copy.deepcopy(model).to(CUDA)
    finally:
        torch.set_float32_matmul_precision(previous)


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(CAPS), 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _losses_and_grad(model, images: torch.Tensor, autocast: torch.dtype | None):
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
        tokens = model.image_tokens(images.to(device))
        itc = model.itc_loss(tokens, CAPS)["loss"]
        lm = model.lm_loss(tokens, CAPS, prompt="a photo of ")["loss"]
    (itc + lm).backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return itc.item(), lm.item(), torch.cat(grads).float().cpu()


def test_cuda_gives_the_cpu_losses_and_gradients_and_bf16_autocast_the_losses(pair):
    """In fp32 the GPU computes the CPU's function; hardware=gpu's bf16 autocast then changes
    the losses by rounding only (its gradients differ by bf16 noise, too seed-dependent for a
    tight check on a tiny model: cosine .96-.9997 to fp32 over 8 seeds on the CPU)."""
    cpu, cuda = pair
    images = _images()
    itc_ref, lm_ref, grad_ref = _losses_and_grad(cpu, images, None)
    itc, lm, grad = _losses_and_grad(cuda, images, None)
    assert (itc, lm) == (pytest.approx(itc_ref, rel=1e-4), pytest.approx(lm_ref, rel=1e-4))
    assert (grad - grad_ref).norm() <= 1e-3 * grad_ref.norm()
    itc, lm, _ = _losses_and_grad(cuda, images, torch.bfloat16)
    assert (itc, lm) == (pytest.approx(itc_ref, rel=3e-2), pytest.approx(lm_ref, rel=3e-2))


def test_cached_fp16_features_give_the_image_loss_on_cuda(pair):
    """The feature cache stores the tower's output in fp16; on the GPU the step that reads it
    must compute the loss of the step that runs the tower."""
    _, cuda = pair
    images = _images(1).to(CUDA)
    with torch.no_grad():
        features = cuda.encode_images(images).half()
        from_images = cuda({"image": images, "caption": CAPS}, objective="lm")["loss"]
        from_cache = cuda({"features": features, "caption": CAPS}, objective="lm")["loss"]
    assert from_cache.item() == pytest.approx(from_images.item(), rel=1e-3)


LOOPS = {
    "bita loop, CUDA graph": {"beam_loop": "bita", "cuda_graph": True},
    "bita loop, eager": {"beam_loop": "bita", "cuda_graph": False},
    "transformers": {"beam_loop": "transformers"},
}


@pytest.mark.parametrize("loop", LOOPS.values(), ids=LOOPS.keys())
def test_beam_search_on_cuda_writes_the_cpu_captions(pair, loop):
    cpu, cuda = pair
    images = _images(2)
    settings = {"prompt": "", "num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 3}
    expected = cpu.generate(cpu.image_tokens(images), beam_loop="transformers", **settings)
    for _ in range(2):  # the second batch replays the graph the first one captured
        captions = cuda.generate(cuda.image_tokens(images.to(CUDA)), **loop, **settings)
        assert captions == expected
    assert all(captions)


def test_graphed_steps_under_bf16_autocast_compute_the_eager_steps(pair):
    """hardware=gpu decodes under bf16 autocast: each captured step must replay what the eager
    step computes there, casts included."""
    from bita.models.prefix_decoder import GraphedSteps, PrefixDecoder

    _, cuda = pair
    lm = cuda.llm.model
    embeds = torch.randn(2, 5, lm.config.hidden_size, device=CUDA)
    tokens = torch.tensor([5, 6, 7, 8, 9, 10], device=CUDA)
    source = torch.tensor([2, 2, 0, 4, 3, 5], device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        decoder = PrefixDecoder(lm, batch=2, beams=3, prefix_len=5, new_tokens=4)
        graphed = GraphedSteps(decoder)
        decoder.prefill(embeds)
        for position in range(3):  # each reads what the one before wrote; both ways alike
            replayed = graphed(tokens + position, source, position).clone()
            eager = decoder.step(tokens + position, source, position)
            assert replayed.dtype == eager.dtype == torch.float32
            torch.testing.assert_close(replayed, eager, rtol=1e-2, atol=1e-2)
