"""A stand-in for BITA with the contract's `caption`, and hand-made eval batches.

Image i is a constant tensor of value i; the fake model captions it with CAPTIONS[i], so tests
know exactly which caption each image gets (some match their references, some do not).
"""

import io

import torch
from PIL import Image

REFERENCES = [
    ["a plane is parked at the airport", "an airplane stands near the terminal"],
    ["many green trees grow in the forest", "a dense forest with green trees"],
    ["a river runs through the farmland", "farmland lies on both sides of a river"],
    ["some buildings surround a square", "a square is surrounded by buildings"],
    ["a baseball field beside a road", "there is a baseball field near the road"],
    ["a beach with blue sea water", "the sea meets a yellow beach"],
]
CAPTIONS = [
    "a plane is parked at the airport",
    "a dense forest with green trees",
    "some buildings surround a square",
    "a baseball field near a river",
    "many green trees grow in the forest",
    "the sea meets a yellow beach",
]


class FakeBITA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def caption(self, images=None, features=None, image_ids=None, **kwargs):
        assert not self.training, "captioning must run in eval mode"
        assert images.device == self.weight.device
        assert not torch.is_grad_enabled()
        self.calls.append(kwargs)
        return [CAPTIONS[int(value)] + "\n" for value in images[:, 0, 0, 0]]


def png_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (40 * index, 100, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_batches(indices_per_batch: list[list[int]], dataset: str = "demo") -> list[dict]:
    return [
        {
            "image": torch.stack([torch.full((3, 8, 8), float(i)) for i in indices]),
            "image_id": [f"{dataset}_{i}" for i in indices],
            "filename": [f"img {i}.png" for i in indices],
            "references": [REFERENCES[i] for i in indices],
            "image_bytes": [png_bytes(i) for i in indices],
            "dataset": [dataset] * len(indices),
        }
        for indices in indices_per_batch
    ]
