"""Models-from-code entry point of the final model's MLflow pyfunc: flows.model_registry logs this file
as `python_model`, so the model holds code (this file and `models/`), not a pickle, and loads without
this repository."""

from mlflow.models import set_model

from models.serving import EQFacePyfunc

set_model(EQFacePyfunc())
