"""The fine-tuned checkpoint as an MLflow model: logged, registered, loaded, served over HTTP."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bita import Captioner
from bita.tracking import Tracker


@pytest.fixture(scope="module")
def logged(tiny_checkpoint, tmp_path_factory):
    """(store URI, run id) of a run whose captioner is the tiny checkpoint, registered as
    `bita-captioner`."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri=uri, experiment="serving")
    run_id = tracker.start_run(root / "run", run_name="tiny/stage-finetune", config={"a": 1})
    tracker.log_captioner(tiny_checkpoint, register_as="bita-captioner")
    tracker.finish()
    return uri, run_id


@pytest.fixture(scope="module")
def two_images(shared_data) -> list[Path]:
    return sorted((shared_data / "rsicd" / "images").glob("*.jpg"))[:2]


def test_logged_model_read_back(logged):
    from mlflow import MlflowClient

    uri, run_id = logged
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("serving")
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.name == "captioner" and model.source_run_id == run_id
    run = client.get_run(run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    (version,) = client.search_model_versions("name = 'bita-captioner'")
    assert version.run_id == run_id
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert "MLmodel" in files


def test_pyfunc_predict_equals_bita_caption(logged, tiny_checkpoint, two_images):
    import mlflow
    import pandas as pd

    uri, run_id = logged
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/captioner")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["image"] and model.metadata.get_output_schema().input_names() == ["caption"]
    table = pd.DataFrame({"image": [path.read_bytes() for path in two_images]})
    expected = Captioner.from_checkpoint(tiny_checkpoint).caption([str(p) for p in two_images])
    assert list(model.predict(table)["caption"]) == expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict, server: subprocess.Popen, deadline: float) -> dict:
    """POST `body` as JSON, retrying while the server is still starting."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    while True:
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(1)


@pytest.mark.slow
def test_mlflow_models_serve_captions_image_bytes(logged, tiny_checkpoint, two_images, tmp_path):
    uri, run_id = logged
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/captioner"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    # as in an activated venv: MLflow starts `uvicorn` from PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        images = [base64.b64encode(p.read_bytes()).decode() for p in two_images]
        body = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
        url = f"http://127.0.0.1:{port}/invocations"
        answer = _post(url, body, server, time.monotonic() + 180)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=60)
        log.close()
    expected = Captioner.from_checkpoint(tiny_checkpoint).caption([str(p) for p in two_images])
    assert [row["caption"] for row in answer["predictions"]] == expected
