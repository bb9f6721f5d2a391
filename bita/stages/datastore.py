"""The retrieval datastore a stage reads (`model.retrieval`): reused when one fits the run's
tower and training split, built otherwise, and recorded in the config its checkpoints save."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from omegaconf import open_dict

from bita.data import features, stream
from bita.data.datastore import build_datastore, training_data_settings
from bita.data.shards import replace_folder
from bita.models.retrieval import (
    Datastore,
    DatastoreFormatError,
    datastore_settings,
    fingerprint,
    tower_key_settings,
)
from bita.stages.context import StageContext

log = logging.getLogger(__name__)

FOLDER = "retrieval"  # under the stage folder, and under a checkpoint's assets/


def attach_datastore(ctx: StageContext, model: torch.nn.Module) -> None:
    """Give `model` the datastore of this run's tower and training split when it retrieves
    captions and has an LM to read them, and record its folder and fingerprint in `ctx.cfg`.

    A folder named in `model.retrieval.datastore` must fit (it is refused otherwise, naming
    both fingerprints); else the start checkpoint's (`<init_from>/assets/retrieval`) or this
    stage's own (`<stage dir>/retrieval`, a resumed stage) is reused if it fits, and a new one
    is built there otherwise. Every process builds the same datastore; rank 0 writes it."""
    settings = model.settings.retrieval
    if not settings.enabled or model.llm is None:
        return
    tower = tower_key_settings(ctx.cfg.encoder, model.encoder)
    data = training_data_settings(ctx.cfg.dataset)
    expected = datastore_settings(tower, settings, data)
    if settings.datastore:
        folder, store = Path(settings.datastore), Datastore.load(settings.datastore)
    else:
        folder, store = _fitting(ctx, fingerprint(expected)) or _build(ctx, model, expected)
    model.use_datastore(store, expected)
    with open_dict(ctx.cfg):
        ctx.cfg.model.retrieval.datastore = str(folder)
        ctx.cfg.model.retrieval.fingerprint = store.fingerprint


def _fitting(ctx: StageContext, want: str) -> tuple[Path, Datastore] | None:
    """The first existing datastore among the start checkpoint's and this stage's own whose
    fingerprint is `want`; one that does not fit is logged with both fingerprints."""
    candidates = [ctx.stage_dir / FOLDER]
    if ctx.cfg.init_from:
        candidates.insert(0, Path(ctx.cfg.init_from) / "assets" / FOLDER)
    for folder in candidates:
        if not folder.is_dir():
            continue
        try:
            store = Datastore.load(folder)
        except DatastoreFormatError as err:
            log.info("retrieval datastore %s not reused: %s", folder, err)
            continue
        if store.fingerprint == want:
            log.info("retrieval datastore %s reused (fingerprint %s)", folder, want)
            return folder, store
        log.info(
            "retrieval datastore %s has fingerprint %s, this run needs %s: not reused",
            folder,
            store.fingerprint,
            want,
        )
    return None


def _build(ctx: StageContext, model: torch.nn.Module, expected: dict) -> tuple[Path, Datastore]:
    """Build the datastore from the feature cache when its training views are eval views,
    else from the image shards through the tower; rank 0 writes it to `<stage dir>/retrieval`
    (atomically: a complete folder or none)."""
    cache = features.open_cache(
        ctx.cfg.get("features"),
        ctx.cfg.dataset,
        ctx.cfg.encoder,
        model.encoder,
        augment=bool(ctx.cfg.augment),
    )
    split = ctx.cfg.dataset.train_split
    if cache and not ctx.cfg.augment:
        shards = cache.train_shards(ctx.cfg.dataset, split)
    else:  # cached training views are random crops: keys come from the eval view
        transform = features.cache_transforms(model.preprocess)["eval"]
        shards = stream.image_shards(ctx.cfg.dataset, transform)
    log.info("retrieval datastore: building from %s (%s)", shards.root, shards.field)
    store = build_datastore(
        ctx.cfg.dataset,
        shards,
        model.encoder,
        model.settings.retrieval.caption,
        expected,
        batch_size=int(ctx.cfg.features.batch_size),
    )
    folder = ctx.stage_dir / FOLDER
    if ctx.dist.is_main:
        staging = folder.with_name(f".{FOLDER}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        replace_folder(store.save(staging), folder)
    return folder, store
