"""The model's code for MLflow's "models from code": the file ``log_model(python_model=...)`` names.

MLflow runs this file when it loads the model; the ``emassist`` package ships beside it (``code_paths``), so the
model is the package's own :class:`emassist.serve.pyfunc.SemClassifier`. Nothing imports this module.
"""

import mlflow

from emassist.serve.pyfunc import SemClassifier

mlflow.models.set_model(SemClassifier())
