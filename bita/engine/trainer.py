"""The one training loop every stage runs: DeepSpeed engine, resume, logging, checkpoints.

Stages supply what differs — a batch source, a loss and an optional per-epoch evaluation — and
this loop does the rest the same way for all of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bita.engine.checkpoint import (
    LAST,
    PREVIOUS,
    DamagedCheckpointError,
    TrainState,
    latest_intact,
    load_checkpoint,
    resume_source,
    save_checkpoint,
    ways_on,
)
from bita.engine.deepspeed_config import batch_layout, deepspeed_config
from bita.engine.distributed import DistInfo
from bita.engine.schedule import build_optimizer, build_scheduler
from bita.engine.throughput import ThroughputMeter
from bita.errors import UserError
from bita.options import check_schedule

log = logging.getLogger(__name__)

MakeBatches = Callable[[int, int], Iterable[dict]]
LossFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


class NonFiniteLossError(UserError, RuntimeError):
    """More non-finite losses than `train.max_bad_steps` allows."""


@dataclass
class FitResult:
    """How `fit` ended: final position, checkpoint folders, last metrics."""

    step: int
    epoch: int
    last: Path
    best: Path | None
    best_metric: float | None
    bad_steps: int
    metrics: dict[str, float]


class _LossModule(nn.Module):
    """Runs the stage's loss inside the engine's forward, so DeepSpeed's autocast and ZeRO-3
    parameter gathering apply to it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_fn(self.model, batch)


class _RunningMeans:
    """Scalar outputs summed on the device; read (one sync) only at log time."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, out: Mapping[str, Any]) -> None:
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.detach().float().reshape(())
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def pop(self, world_size: int) -> dict[str, float]:
        if not self.count:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / self.count
        if world_size > 1:
            import torch.distributed as tdist

            tdist.all_reduce(means)
            means /= world_size
        self.sums, self.count = {}, 0
        return dict(zip(keys, means.tolist(), strict=True))


def _scalars_as_vectors(fn: Callable, params_of: Callable) -> Callable:
    """Wrap a DeepSpeed method that broadcasts parameters through a uint8 view, which 0-dim
    tensors cannot take: around the call they have shape [1], then get their shape back
    (under ZeRO-3 also the shape they are gathered into, `ds_shape`)."""

    def wrapped(owner, *args, **kwargs):
        scalars = [p for p in params_of(owner, *args) if p.ndim == 0]
        for param in scalars:
            param.data = param.data.reshape(1)
        try:
            return fn(owner, *args, **kwargs)
        finally:
            for param in scalars:
                if hasattr(param, "ds_shape"):
                    param.ds_shape = torch.Size([])
                if param.data.numel() == 1:  # ZeRO-3 leaves partitioned params empty
                    param.data = param.data.reshape(())

    return wrapped


@contextlib.contextmanager
def _broadcast_accepts_scalars() -> Iterator[None]:
    """DeepSpeed 0.19 cannot broadcast 0-dim parameters (BITA's `temp`, CLIP's `logit_scale`)
    when it syncs initial weights (all stages) or partitions them (ZeRO-3); patch those two
    methods while `deepspeed.initialize` runs."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    targets = [
        (DeepSpeedEngine, "_broadcast_model", lambda engine: list(engine.module.parameters())),
        (Init, "_zero_init_param", lambda init, param: [param]),
    ]
    originals = [getattr(cls, name) for cls, name, _ in targets]
    for (cls, name, params_of), fn in zip(targets, originals, strict=True):
        setattr(cls, name, _scalars_as_vectors(fn, params_of))
    try:
        yield
    finally:
        for (cls, name, _), fn in zip(targets, originals, strict=True):
            setattr(cls, name, fn)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _selection_score(metrics: Mapping[str, float], select_metric: str) -> float:
    """`select_metric` names one metric or a `+`-joined sum (fine-tune: `val/CIDEr+val/Bleu_4`)."""
    names = [name.strip() for name in select_metric.split("+")]
    missing = [name for name in names if name not in metrics]
    if missing:
        raise KeyError(
            f"select_metric {select_metric!r}: on_epoch_end returned no {missing}; "
            f"it returned {sorted(metrics)}"
        )
    return float(sum(metrics[name] for name in names))


class Trainer:
    """DeepSpeed training of `model`'s trainable parameters.

    Reads `hardware` (accelerator, zero_stage, precision, autocast, micro_batch_size,
    gradient_clipping, peak_tflops, deepspeed), `optim` (lr, end_lr, weight_decay, betas,
    warmup_steps, lr_scales) and `train` (epochs, max_steps, global_batch_size, resume,
    log_every, save_every_steps, max_bad_steps). `config` is the composed run config written
    beside the weights so that checkpoints describe themselves. `flops_per_sample` (the
    model's estimate) enables MFU on CUDA; `metric_prefix` (e.g. "pretrain1/") is prepended to
    every metric this trainer sends to the tracker.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        hardware: Mapping,
        optim: Mapping,
        train: Mapping,
        run_dir: str | Path,
        tracker: Any = None,
        dist: DistInfo,
        config: Any = None,
        flops_per_sample: float | None = None,
        metric_prefix: str = "",
    ) -> None:
        check_schedule(train, optim)
        self.model = model
        self.hardware, self.optim, self.train = hardware, optim, train
        self.tracker, self.dist, self.config = tracker, dist, config
        self.flops_per_sample, self.metric_prefix = flops_per_sample, metric_prefix
        self.checkpoint_dir = Path(run_dir) / "checkpoints"
        self.layout = batch_layout(hardware, train, dist.world_size)
        self.ds_config = deepspeed_config(hardware, train, dist.world_size)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self._clip = self._own_clipping()
        self.engine = None
        self._scheduler = None
        self._trainable: list[nn.Parameter] = []
        self._warned_short_epoch = False

    def _own_clipping(self) -> float:
        """Max grad norm this loop applies itself (0 = DeepSpeed does it, or no clipping).

        Without ZeRO or a DeepSpeed precision wrapper, DeepSpeed clips by multiplying each
        gradient in place by a [1]-shaped factor, which fails for 0-dim parameters (BITA's
        `temp`). Clipping here, after DeepSpeed's gradient all-reduce, is the same operation.
        """
        wrapped = "bf16" in self.ds_config or "fp16" in self.ds_config
        scaled = self.hardware.get("autocast") == "fp16"  # its grad scaler unscales inside step
        if self.zero_stage != 0 or wrapped or scaled:
            return 0.0
        clip = float(self.ds_config["gradient_clipping"])
        self.ds_config["gradient_clipping"] = 0.0  # explicit: DeepSpeed's default is 1.0
        return clip

    @property
    def micro_batch_size(self) -> int:
        """Per-rank batch each `make_batches` item must hold."""
        return self.layout.micro_batch_size

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.layout.grad_accum

    @property
    def last_checkpoint_dir(self) -> Path:
        return self.checkpoint_dir / LAST

    @property
    def best_checkpoint_dir(self) -> Path | None:
        """`checkpoints/best` once an epoch was selected, else None."""
        best = self.checkpoint_dir / "best"
        return best if best.is_dir() else None

    def _track(self, metrics: Mapping[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(
                {self.metric_prefix + k: v for k, v in metrics.items()}, step=step
            )

    # -------------------------------------------------------------- set-up

    def _initialize(self, loss_fn: LossFn, total_steps: int) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        optimizer = build_optimizer(self.model, self.optim)
        scheduler = build_scheduler(optimizer, self.optim, total_steps)
        with _broadcast_accepts_scalars():
            self.engine, _, _, _ = deepspeed.initialize(
                model=_LossModule(self.model, loss_fn),
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=self.ds_config,
                dist_init_required=False,
            )
        self._scheduler = scheduler
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _resume(self, source: Path | None, total: int) -> TrainState:
        """Load `source` (see `resume_source`); a damaged file is named with the ways on."""
        if source is None:
            return TrainState(world_size=self.dist.world_size)
        try:
            state = load_checkpoint(
                source,
                model=self.model,
                optimizer=self.engine.optimizer,
                scheduler=self._scheduler,
                dist=self.dist,
                zero_stage=self.zero_stage,
            )
        except DamagedCheckpointError as err:
            raise DamagedCheckpointError(f"{err}. {ways_on(self.checkpoint_dir)}") from err
        if state.finished and state.step < total:
            raise UserError(
                f"{source} is the final checkpoint of a finished stage (step {state.step}, "
                f"no optimizer state), and this run asks for {total} steps: start over with "
                f"train.resume=never, or train on from its weights with init_from={source}"
            )
        # DeepSpeed finds accumulation boundaries from micro_steps; keep its counters in line.
        self.engine.global_steps = state.step
        self.engine.global_samples = state.step * self.layout.global_batch_size
        self.engine.micro_steps = state.step * self.layout.grad_accum
        if self.dist.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                source,
                state.step,
                state.epoch,
                state.batch_in_epoch,
            )
        return state

    # -------------------------------------------------------------- pieces of the loop

    def _save(self, name: str, state: TrainState, *, final: bool = False) -> Path:
        """Write `last` (kept as `previous` when replaced; `final`: without optimizer state) or
        `best` (a model only: neither optimizer nor RNG state)."""
        resumable = name == LAST and not final
        return save_checkpoint(
            self.checkpoint_dir / name,
            model=self.model,
            optimizer=self.engine.optimizer,
            scheduler=self._scheduler,
            state=state,
            config=self.config,
            dist=self.dist,
            zero_stage=self.zero_stage,
            with_optimizer=resumable,
            with_rng=name == LAST,
            previous=self.checkpoint_dir / PREVIOUS if resumable else None,
        )

    def _finish(self, state: TrainState) -> None:
        """Rewrite `last` as the stage's final checkpoint, without the optimizer state that
        only an unfinished stage's resume reads (a changed schedule makes a new run folder, so
        nothing trains on from a finished one), and drop `previous`. The RNG state stays: a
        pipeline resumed after this stage draws what an uninterrupted one draws."""
        if state.finished:  # resumed from the final checkpoint: nothing was trained
            return
        state.finished = True
        self._save(LAST, state, final=True)
        if self.dist.is_main:
            shutil.rmtree(self.checkpoint_dir / PREVIOUS, ignore_errors=True)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank must agree to skip, or the gradient all-reduce would hang.

        This is the loop's one per-micro-batch device sync; skipping a bad step needs it.
        """
        flag = torch.isfinite(loss.detach()).all().float()
        if self.dist.world_size > 1:
            import torch.distributed as tdist

            tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        return bool(flag.item())

    def _bad_step(self, state: TrainState, epoch: int) -> None:
        state.bad_steps += 1
        limit = int(self.train.get("max_bad_steps", 0))
        where = f"step {state.step}, epoch {epoch}, batch {state.batch_in_epoch}"
        if state.bad_steps > limit:
            last = latest_intact(self.checkpoint_dir)
            raise NonFiniteLossError(
                f"{state.bad_steps} non-finite losses, more than train.max_bad_steps={limit} "
                f"(latest at {where}); the last good checkpoint is {last or 'not written yet'}. "
                "Lower optim.lr, check the data, or raise train.max_bad_steps."
            )
        if state.bad_steps == 1:
            log.warning(
                "non-finite loss at %s: step skipped (counted; train.max_bad_steps=%d)",
                where,
                limit,
            )

    def _log(self, state: TrainState, means: _RunningMeans, meter: ThroughputMeter, bar) -> dict:
        metrics = {f"train/{k}": v for k, v in means.pop(self.dist.world_size).items()}
        metrics.update({f"train/{k}": v for k, v in meter.measure().items()})
        metrics["train/lr"] = max(self._scheduler.get_last_lr())
        metrics["train/bad_steps"] = float(state.bad_steps)
        postfix = {
            "loss": metrics.get("train/loss"),
            "lr": metrics["train/lr"],
            "samples/s": metrics["train/samples_per_s"],
            "mfu": metrics.get("train/mfu"),
        }
        bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items() if v is not None}, refresh=False)
        self._track(metrics, state.step)
        return metrics

    # -------------------------------------------------------------- the loop

    def fit(
        self,
        make_batches: MakeBatches,
        loss_fn: LossFn,
        *,
        steps_per_epoch: int,
        epochs: int,
        on_epoch_end: Callable[[int], dict[str, float]] | None = None,
        select_metric: str | None = None,
    ) -> FitResult:
        """Train until `epochs` (or `train.max_steps` optimizer steps) are done.

        `make_batches(epoch, skip_batches)` yields this rank's micro-batches of
        `micro_batch_size` for that epoch, starting after `skip_batches` of them; an epoch is
        `steps_per_epoch * grad_accum` micro-batches. `loss_fn(model, batch)` returns a dict
        with `loss` (other scalars are logged as `train/<key>`). `on_epoch_end(epoch)` may
        return metrics (rank 0's count); with `select_metric` the best epoch is kept in
        `checkpoints/best`.
        """
        from tqdm.auto import tqdm

        if steps_per_epoch <= 0:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch}: the dataset yields no optimizer step "
                "at this train.global_batch_size"
            )
        max_steps = self.train.get("max_steps")
        total = int(max_steps) if max_steps is not None else steps_per_epoch * int(epochs)
        n_epochs = math.ceil(total / steps_per_epoch) if max_steps is not None else int(epochs)
        source = resume_source(self.checkpoint_dir, self.train.get("resume", "auto"))
        self._initialize(loss_fn, total)
        state = self._resume(source, total)
        peak = self.hardware.get("peak_tflops") if self.dist.device.type == "cuda" else None
        meter = ThroughputMeter(
            self.layout.global_batch_size, self.dist.world_size, self.flops_per_sample, peak
        )
        means = _RunningMeans()
        metrics: dict[str, float] = {}
        bar = tqdm(
            total=total,
            initial=state.step,
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            desc="train",
        )
        try:
            while True:
                if state.epoch_end_pending and on_epoch_end is not None:
                    metrics.update(self._end_epoch(on_epoch_end, state, select_metric))
                if state.epoch >= n_epochs or state.step >= total:
                    break
                epoch = state.epoch
                finished = self._run_epoch(
                    make_batches, epoch, state, total, steps_per_epoch, means, meter, bar, metrics
                )
                if not finished:
                    break
                state.epoch, state.batch_in_epoch = epoch + 1, 0
                # Saved before validating, so a kill during validation costs only the validation.
                state.epoch_end_pending = on_epoch_end is not None
                self._save(LAST, state)
        finally:
            bar.close()
        self._finish(state)
        return FitResult(
            state.step,
            state.epoch,
            self.last_checkpoint_dir,
            self.best_checkpoint_dir,
            state.best_metric,
            state.bad_steps,
            metrics,
        )

    def _run_epoch(
        self, make_batches, epoch, state, total, steps_per_epoch, means, meter, bar, metrics
    ) -> bool:
        """One epoch from the saved data position; False when max_steps stopped it early."""
        per_epoch = steps_per_epoch * self.layout.grad_accum
        if state.batch_in_epoch >= per_epoch:
            return True
        log_every = int(self.train.get("log_every", 10))
        save_every = int(self.train.get("save_every_steps", 0))
        self.model.train()  # on_epoch_end may have left it in eval mode
        for batch in make_batches(epoch, state.batch_in_epoch):
            state.batch_in_epoch += 1
            out = self.engine(_to_device(batch, self.dist.device))
            if not self._all_finite(out["loss"]):
                self._bad_step(state, epoch)
            else:
                self.engine.backward(out["loss"])
                if self._clip and self.engine.is_gradient_accumulation_boundary():
                    torch.nn.utils.clip_grad_norm_(self._trainable, self._clip)
                self.engine.step()
                means.add(out)
            if self.engine.global_steps > state.step:
                state.step = self.engine.global_steps
                meter.step()
                bar.update(1)
                if state.step % log_every == 0 or state.step == total:
                    metrics.update(self._log(state, means, meter, bar))
                if save_every and state.step % save_every == 0:
                    self._save(LAST, state)
                if state.step >= total:
                    return state.batch_in_epoch >= per_epoch
            if state.batch_in_epoch >= per_epoch:
                return True
        if not self._warned_short_epoch:
            self._warned_short_epoch = True
            warnings.warn(
                f"epoch {epoch} yielded {state.batch_in_epoch} micro-batches, expected "
                f"{per_epoch} (steps_per_epoch x grad_accum); moving on",
                stacklevel=2,
            )
        return True

    def _end_epoch(
        self, on_epoch_end, state: TrainState, select_metric: str | None
    ) -> dict[str, float]:
        """Validate the epoch that just ended and keep it as `best` if it scores highest. The
        next save of `last` records that this ran; a kill before then runs it again."""
        epoch_metrics = on_epoch_end(state.epoch - 1) or {}
        state.epoch_end_pending = False
        self._track(epoch_metrics, state.step)
        if select_metric is None:
            return epoch_metrics
        score = _selection_score(epoch_metrics, select_metric) if self.dist.is_main else None
        if self.dist.world_size > 1:
            import torch.distributed as tdist

            shared = [score]
            tdist.broadcast_object_list(shared, src=0)
            score = shared[0]
        if state.best_metric is None or score > state.best_metric:
            state.best_metric = score
            self._save("best", state)
        return epoch_metrics
