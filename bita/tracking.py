"""MLflow run tracking that never stops a run.

A local SQLite store (`sqlite:///mlflow.db`) is the default: MLflow >= 3 refuses a plain
`./mlruns` file store. Params are write-once in MLflow, so a resumed run reuses its run id
(stored in the run folder) and logs only params it has not logged before. Any store error is
reported once and tracking is switched off for the rest of the process. Only rank 0 tracks.
MLflow is imported lazily: it costs a second at import time.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RUN_FILE = "mlflow_run.json"
SWEEP_TAG = "bita.sweep"
_PARAM_CHUNK = 100  # MLflow's per-request param limit
_PARAM_MAX_LEN = 6000


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Dotted-key strings of a nested config (resolved first): MLflow params are flat strings."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value)[:_PARAM_MAX_LEN]
    return flat


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, not in the current folder."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent.resolve() / "mlartifacts").as_uri()


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
    ) -> None:
        self.enabled = bool(enabled) and rank == 0
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self._client = None
        self._experiment_id: str | None = None

    @classmethod
    def from_config(cls, tracking: Mapping, *, rank: int = 0) -> Tracker:
        """From the `tracking` config section (`enabled`, `uri`, `experiment`)."""
        return cls(
            enabled=tracking.get("enabled", True),
            uri=str(tracking.get("uri", "sqlite:///mlflow.db")),
            experiment=str(tracking.get("experiment", "bita")),
            rank=rank,
        )

    @classmethod
    def start(
        cls,
        cfg: Any,
        *,
        run_dir: str | Path,
        overrides: Sequence[str] = (),
        sweep_dir: str | Path | None = None,
        enabled: bool = True,
    ) -> Tracker:
        """Open the run of `python -m bita.run`: store from `cfg.tracking`, the resolved config
        as params and as `config.yaml`, the Hydra overrides as tags, and — in a multirun —
        nesting under the sweep's parent run (one per `sweep_dir`)."""
        tracker = cls.from_config(cfg["tracking"])
        tracker.enabled = tracker.enabled and enabled
        parent = None
        if sweep_dir is not None:
            parent = tracker.sweep_parent(str(sweep_dir), run_name=f"{cfg['name']} sweep")
        tags = {"overrides": " ".join(overrides)}
        tags.update({f"override.{o.split('=', 1)[0]}": o.partition("=")[2] for o in overrides})
        tracker.start_run(
            run_dir, run_name=str(run_dir), config=cfg, tags=tags, parent_run_id=parent
        )
        tracker.log_config(cfg)
        return tracker

    # -------------------------------------------------------------- plumbing

    def _disable(self, err: Exception) -> None:
        self.enabled = False
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
            self._disable(err)
            return None

    def _connect(self) -> None:
        if self._client is not None:
            return
        if self.uri.startswith(("http://", "https://")):
            # MLflow retries an unreachable server for minutes by default.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            exp_id = client.create_experiment(
                self.experiment, artifact_location=_artifact_root(self.uri)
            )
        else:
            exp_id = found.experiment_id
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
            run_tags = {"mlflow.runName": run_name, **tags}
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run = self._client.create_run(self._experiment_id, run_name=run_name, tags=run_tags)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_FILE).write_text(
                json.dumps({"run_id": run.info.run_id, "uri": self.uri})
            )
        else:
            self._client.update_run(run.info.run_id, status="RUNNING")
            self._set_tags(run.info.run_id, tags)
        self.run_id = run.info.run_id
        self.parent_run_id = parent_run_id
        if config is not None:
            self._log_params(run.data.params, flatten(config))
        return self.run_id

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
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), _PARAM_CHUNK):
            self._client.log_batch(self.run_id, params=new[i : i + _PARAM_CHUNK])

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

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
        found = self._client.search_runs(
            [self._experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{quoted}'", max_results=1
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

    def finish(self, status: str = "FINISHED") -> None:
        """End this tracker's run (`FINISHED`, `FAILED` or `KILLED`).

        A sweep's parent is marked finished with each child, so no parent stays RUNNING after
        the last job; the next job simply adds its child.
        """
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
