"""The MLflow model file of the pyfunc captioner (MLflow's models-from-code form).

MLflow copies this file into a logged model and runs it when the model is loaded, instead of
unpickling a Python object; see `bita.serving`.
"""

import mlflow

from bita.serving import CaptionerModel

mlflow.models.set_model(CaptionerModel())
