"""A trained checkpoint as an MLflow model: a `pyfunc` captioner that MLflow loads and serves.

    import mlflow
    captioner = mlflow.pyfunc.load_model("runs:/RUN_ID/captioner")
    captioner.predict(pandas.DataFrame({"image": [open("a.jpg", "rb").read()]}))  # -> captions

    mlflow models serve -m runs:/RUN_ID/captioner --env-manager local -h 127.0.0.1 -p 5001

The model wraps `bita.Captioner`: its artifact is the checkpoint folder (weights, config,
assets; not the optimizer and RNG state, which only resuming needs), loaded by
`Captioner.from_checkpoint`, so serving decodes exactly as `python -m bita.caption` does. Input:
a column `image` of encoded image bytes (JPEG, PNG, TIFF; base64 in JSON over REST, as MLflow
encodes binary columns); output: a column `caption`. Imports MLflow, so it is imported only
where a model is logged or loaded.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from bita.caption import Captioner
from bita.data.images import load_image

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]), outputs=Schema([ColSpec("string", "caption")])
)
MODEL_NAME = "captioner"  # runs:/RUN_ID/captioner
RESUME_ONLY = ("optimizer.*", "rng.*")  # checkpoint files a captioner never reads


class CaptionerModel(PythonModel):
    """`mlflow.pyfunc` face of `bita.Captioner`, decoding with the checkpoint's settings."""

    def load_context(self, context: Any) -> None:
        self.captioner = Captioner.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        column = model_input["image"]
        images = [load_image(bytes(data), name=f"image {i}") for i, data in enumerate(column)]
        return pd.DataFrame({"caption": self.captioner.caption(images)})


def requirements() -> list[str]:
    """What a fresh environment needs to load the model: this package's own dependencies."""
    declared = importlib.metadata.requires("bita") or []
    return [req for req in declared if "extra ==" not in req]


def log_captioner(
    uri: str, experiment_id: str, run_id: str, checkpoint: Path, register_as: str | None
) -> str:
    """Log `checkpoint` as the model `captioner` of run `run_id` (in experiment
    `experiment_id` of the store `uri`), and register it as `register_as` when given; returns
    the model's URI. The model's code is `bita/captioner_model.py`, not a pickled object."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)  # where MLflow files the logged model
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # An input example would make MLflow load the model (an LM of billions) while logging.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        folder = Path(tmp) / checkpoint.name
        shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(*RESUME_ONLY))
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(Path(__file__).with_name("captioner_model.py")),
            artifacts={"checkpoint": str(folder)},
            signature=SIGNATURE,
            pip_requirements=requirements(),
            registered_model_name=register_as,
        )
    return info.model_uri
