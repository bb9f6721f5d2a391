"""MLflow run tracking that never stops a run.

A local SQLite store (`sqlite:///mlflow.db`) is the default: MLflow >= 3 refuses a plain
`./mlruns` file store. Params are write-once in MLflow, so a resumed run reuses its run id
(stored in the run folder) and logs only params it has not logged before. A store that cannot
be used (unreachable server, folder not writable) is reported once and tracking is switched off
for the rest of the process; a single write the store refuses is reported and skipped. Only
rank 0 tracks. MLflow is imported lazily: it costs a second at import time.

Besides params, metrics and artifacts, a run records what a team compares runs by: the
datasets each stage read (MLflow dataset inputs), system metrics from MLflow's own monitor,
and a fine-tune's selected checkpoint as an MLflow model (`bita.serving`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

RUN_FILE = "mlflow_run.json"
SWEEP_TAG = "bita.sweep"
RUN_DIR_TAG = "bita.run_dir"
# The experiment kind MLflow's UI reads to open an experiment on its training runs (not on
# the GenAI trace view).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
_PARAM_CHUNK = 100  # MLflow's per-request param limit
_PARAM_MAX_LEN = 6000
_KEY_MAX_LEN = 250
_KEY_PART = re.compile(r"^[\w\- :]+$")  # a key segment MLflow accepts, without dots or slashes
_KEY_CHARS = re.compile(r"[^\w./\- :]")  # characters MLflow refuses in param and tag keys
# MLflow error codes of a single refused write (as opposed to a store that cannot be used).
_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_LIMIT_EXCEEDED"}


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Dotted-key strings of a nested config (resolved first): MLflow params are flat strings.

    A mapping whose keys are not plain names, such as the fnmatch patterns of
    `optim.lr_scales={llm.*: 0.25}`, becomes one param holding the whole mapping: MLflow
    refuses `*` in a key, and a dotted pattern would read as nesting.
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and all(_KEY_PART.match(str(k)) for k in value):
            flat.update(flatten(value, name))
        elif isinstance(value, Mapping):
            flat[name] = json.dumps(value)[:_PARAM_MAX_LEN]
        else:
            flat[name] = str(value)[:_PARAM_MAX_LEN]
    return flat


def tag_key(name: str) -> str:
    """`name` as a tag key MLflow accepts: refused characters become `_`."""
    return _KEY_CHARS.sub("_", name)[:_KEY_MAX_LEN]


def _refused_key(name: str) -> bool:
    return (
        len(name) > _KEY_MAX_LEN
        or bool(_KEY_CHARS.search(name))
        or os.path.normpath(name) != name  # MLflow treats keys as paths in places
    )


def _is_refusal(err: Exception) -> bool:
    return getattr(err, "error_code", None) in _REFUSED


def check_writable(uri: str) -> None:
    """Raise PermissionError (or OSError) at once when a SQLite store's database or folder
    cannot be written: MLflow would otherwise retry for about 100 s before giving up."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    try:
        with tempfile.TemporaryFile(dir=db.parent):
            pass
        if db.exists():
            with db.open("ab"):
                pass
    except OSError as err:
        raise PermissionError(
            f"cannot write the database {db} or its folder {db.parent.resolve()} ({err})"
        ) from err


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, not in the current folder."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent.resolve() / "mlartifacts").as_uri()


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise, across the processes of a sweep, what must happen once per SQLite store:
    creating its tables (two jobs migrating a new database at once fail) and a sweep's parent
    run (two jobs searching at once would each create one)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    with FileLock(f"{uri.removeprefix('sqlite:///')}.lock", timeout=600):
        yield


class Tracker:
    """One MLflow run (optionally nested under a sweep's parent run).

    `Tracker.start(cfg, run_dir=..., overrides=..., sweep_dir=..., enabled=rank == 0)` does the
    whole set-up in one call; `from_config` + `start_run` are its parts. Every method is a
    no-op when disabled (rank != 0, `tracking.enabled: false`, or after the first store error).
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        uri: str = "sqlite:///mlflow.db",
        experiment: str = "bita",
        rank: int = 0,
        system_metrics_every: float | None = None,
    ) -> None:
        self.enabled = bool(enabled) and rank == 0
        self.uri = uri
        self.experiment = experiment
        self.system_metrics_every = system_metrics_every
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self._client = None
        self._experiment_id: str | None = None
        self._monitor = None
        self._datasets: set[tuple[str, str, str]] = set()

    @classmethod
    def from_config(cls, tracking: Mapping, *, rank: int = 0) -> Tracker:
        """From the `tracking` config section (`enabled`, `uri`, `experiment`,
        `system_metrics_every`)."""
        every = tracking.get("system_metrics_every")
        return cls(
            enabled=tracking.get("enabled", True),
            uri=str(tracking.get("uri", "sqlite:///mlflow.db")),
            experiment=str(tracking.get("experiment", "bita")),
            rank=rank,
            system_metrics_every=float(every) if every else None,
        )

    @classmethod
    def start(
        cls,
        cfg: Any,
        *,
        run_dir: str | Path,
        run_name: str,
        overrides: Sequence[str] = (),
        sweep_dir: str | Path | None = None,
        sweep_name: str | None = None,
        enabled: bool = True,
    ) -> Tracker:
        """Open the run of `python -m bita.run`: store from `cfg.tracking`, the resolved config
        as params and as `config.yaml`, the Hydra overrides and the run folder as tags, and —
        in a multirun — nesting under the sweep's parent run (one per `sweep_dir`, named
        `sweep_name`)."""
        tracker = cls.from_config(cfg["tracking"])
        tracker.enabled = tracker.enabled and enabled
        parent = None
        if sweep_dir is not None:
            sweep_tags = {RUN_DIR_TAG: str(Path(sweep_dir).resolve())}
            parent = tracker.sweep_parent(
                str(sweep_dir), run_name=sweep_name or str(sweep_dir), tags=sweep_tags
            )
        tags = {"overrides": " ".join(overrides), RUN_DIR_TAG: str(Path(run_dir).resolve())}
        for override in overrides:
            key, _, value = override.partition("=")
            tags[tag_key(f"override.{key.lstrip('+~')}")] = value  # Hydra's +key, ~key
        tracker.start_run(run_dir, run_name=run_name, config=cfg, tags=tags, parent_run_id=parent)
        tracker.log_config(cfg)
        return tracker

    # -------------------------------------------------------------- plumbing

    def _disable(self, err: Exception) -> None:
        self.enabled = False
        self._stop_monitor()
        warnings.warn(
            f"MLflow tracking store {self.uri} is unreachable ({type(err).__name__}: {err}); "
            "the run continues without tracking (set tracking.uri or tracking.enabled=false)",
            RuntimeWarning,
            stacklevel=4,  # the caller of the public method
        )

    def _call(self, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any store failure must not end a training run
            if _is_refusal(err):  # the store works; it refused this one write
                warnings.warn(
                    f"MLflow refused a write to run {self.run_id} ({err}); tracking continues",
                    RuntimeWarning,
                    stacklevel=3,
                )
            else:
                self._disable(err)
            return None

    def _connect(self) -> None:
        if self._client is not None:
            return
        if self.uri.startswith(("http://", "https://")):
            # MLflow retries an unreachable server for minutes by default.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        check_writable(self.uri)
        from mlflow.tracking import MlflowClient

        with store_lock(self.uri):  # a new store's tables are created on first use
            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                exp_id = client.create_experiment(
                    self.experiment,
                    artifact_location=_artifact_root(self.uri),
                    tags=EXPERIMENT_TAGS,
                )
            else:
                exp_id = found.experiment_id
                for key, value in EXPERIMENT_TAGS.items():  # stores made before the tag existed
                    if found.tags.get(key) != value:
                        client.set_experiment_tag(exp_id, key, value)
        self._client, self._experiment_id = client, exp_id

    # -------------------------------------------------------------- runs

    def start_run(
        self,
        run_dir: str | Path,
        *,
        run_name: str,
        config: Any = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Start (or, when `run_dir` holds a run id of this store, resume) the run.

        `config` is logged as flattened params once; on resume, params already logged keep
        their first value and differing new values are only warned about. `tags` (e.g. the
        Hydra overrides) are set every time. Returns the run id, or None when disabled.
        """
        return self._call(self._start, Path(run_dir), run_name, config, tags or {}, parent_run_id)

    def _start(self, run_dir: Path, run_name: str, config, tags, parent_run_id) -> str:
        self._connect()
        run = self._existing_run(run_dir)
        if run is None:
            from mlflow.tracking.context.registry import resolve_tags

            # MLflow's own context tags: user, source (the entry point) and its git commit
            run_tags = resolve_tags({"mlflow.runName": run_name, **tags})
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run = self._client.create_run(self._experiment_id, run_name=run_name, tags=run_tags)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_FILE).write_text(
                json.dumps({"run_id": run.info.run_id, "uri": self.uri})
            )
            resumed = False
        else:
            self._client.update_run(run.info.run_id, status="RUNNING", name=run_name)
            self._set_tags(run.info.run_id, tags)
            resumed = True
        self.run_id = run.info.run_id
        self.parent_run_id = parent_run_id
        if config is not None:
            self._log_params(run.data.params, flatten(config))
        self._start_monitor(resumed)
        return self.run_id

    def _start_monitor(self, resumed: bool) -> None:
        """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where NVML
        sees one) in a background thread, every `system_metrics_every` seconds."""
        if not self.system_metrics_every:
            return
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop notes
        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.system_metrics_every,
            resume_logging=resumed,
            tracking_uri=self.uri,
        )
        self._monitor.start()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()

    def _existing_run(self, run_dir: Path):
        path = run_dir / RUN_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("uri") != self.uri:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(saved["run_id"])
        except MlflowException:
            return None

    def _log_params(self, logged: Mapping[str, str], params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            warnings.warn(
                f"resumed MLflow run {self.run_id} keeps its first values of {len(changed)} "
                f"changed param(s): {', '.join(changed[:10])}",
                RuntimeWarning,
                stacklevel=4,
            )
        refused = sorted(k for k in params if _refused_key(k))
        if refused:
            warnings.warn(
                f"MLflow run {self.run_id}: {len(refused)} param key(s) MLflow refuses are not "
                f"logged: {', '.join(refused[:10])}",
                RuntimeWarning,
                stacklevel=4,
            )
        new = [Param(k, v) for k, v in params.items() if k not in logged and k not in refused]
        for i in range(0, len(new), _PARAM_CHUNK):
            self._client.log_batch(self.run_id, params=new[i : i + _PARAM_CHUNK])

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            batch = [RunTag(tag_key(k), str(v)[:_PARAM_MAX_LEN]) for k, v in tags.items()]
            self._client.log_batch(run_id, tags=batch)

    def sweep_parent(
        self, sweep_id: str, *, run_name: str, tags: Mapping[str, str] | None = None
    ) -> str | None:
        """Run id of the sweep's parent run (tagged `bita.sweep=<sweep_id>`), created if new.

        Pass the result as `parent_run_id` to each job's `start`. Jobs of one sweep must share
        `sweep_id` (e.g. the Hydra sweep dir).
        """
        return self._call(self._sweep_parent, sweep_id, run_name, tags or {})

    def _sweep_parent(self, sweep_id: str, run_name: str, tags) -> str:
        self._connect()
        quoted = sweep_id.replace("\\", "\\\\").replace("'", "\\'")
        with store_lock(self.uri):
            found = self._client.search_runs(
                [self._experiment_id],
                filter_string=f"tags.`{SWEEP_TAG}` = '{quoted}'",
                max_results=1,
            )
            if found:
                return found[0].info.run_id
            run_tags = {"mlflow.runName": run_name, SWEEP_TAG: sweep_id, **tags}
            return self._client.create_run(
                self._experiment_id, run_name=run_name, tags=run_tags
            ).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run this tracker did not start (e.g. a sweep parent at multirun end)."""
        self._call(self._end, run_id, status)

    def _end(self, run_id: str, status: str) -> None:
        self._connect()
        self._client.set_terminated(run_id, status=status)

    # -------------------------------------------------------------- logging

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Metrics at an optimizer step; non-numeric values are dropped."""
        if self.run_id is None:
            return
        self._call(self._log_metrics, metrics, step)

    def _log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def log_config(self, cfg: Any) -> None:
        """The resolved config as the `config.yaml` artifact."""
        from omegaconf import OmegaConf

        if self.run_id is not None:
            text = OmegaConf.to_yaml(OmegaConf.create(cfg), resolve=True)
            self._call(self._client_call, "log_text", text, "config.yaml")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is not None:
            self._call(self._set_tags, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a whole folder under `artifact_path`."""
        if self.run_id is None:
            return
        path = Path(path)
        if path.is_dir():
            self._call(self._client_call, "log_artifacts", str(path), artifact_path)
        else:
            self._call(self._client_call, "log_artifact", str(path), artifact_path)

    def _client_call(self, method: str, *args) -> None:
        getattr(self._client, method)(self.run_id, *args)

    def log_dataset(
        self, *, name: str, split: str, digest: str, location: str, profile: Mapping[str, Any]
    ) -> None:
        """Record a dataset this run reads as an MLflow dataset input, once per run: `name`
        (e.g. `rsicd-train`), `split` as its context, `digest` of its manifest, `location`
        (the manifest's path or URL) as its source and `profile` (counts) beside it."""
        if self.run_id is None or (name, digest, split) in self._datasets:
            return
        self._datasets.add((name, digest, split))
        self._call(self._log_dataset, name, split, digest, location, dict(profile))

    def _log_dataset(self, name, split, digest, location, profile) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        scheme = location.split("://", 1)[0] if "://" in location else "local"
        dataset = Dataset(
            name=name,
            digest=digest,
            source_type=scheme,
            source=json.dumps({"uri": location}),
            profile=json.dumps(profile),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, split)]
        self._client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])

    def log_captioner(self, checkpoint: str | Path, *, register_as: str | None = None) -> None:
        """Log `checkpoint` as this run's MLflow model `captioner` (see `bita.serving`), and
        register it as a new version of `register_as` when given."""
        if self.run_id is None:
            return
        from bita.serving import log_captioner

        self._call(
            log_captioner, self.uri, self._experiment_id, self.run_id, Path(checkpoint), register_as
        )

    def finish(self, status: str = "FINISHED") -> None:
        """End this tracker's run (`FINISHED`, `FAILED` or `KILLED`).

        A sweep's parent is marked finished with each child, so no parent stays RUNNING after
        the last job; the next job simply adds its child.
        """
        self._stop_monitor()
        if self.run_id is not None:
            self._call(self._end, self.run_id, status)
        if self.parent_run_id is not None:
            self._call(self._end, self.parent_run_id, "FINISHED")

    def where_to_look(self) -> str:
        """One line for the end of a run: how to open this run in the MLflow UI."""
        if self.run_id is None:
            return "MLflow tracking was off for this run"
        return (
            f"MLflow: mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --workers 1  "
            f"(experiment {self.experiment!r}, run {self.run_id})"
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")
