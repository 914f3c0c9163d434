"""Am I running inside an Azure ML job? Cheap to import: no azure-ai-ml, no phitune.azure here
(tracking and the pre-flight checks read it; the Azure backends only write the variables).

Azure ML starts every command job (and every sweep trial) with an MLflow run
already open for it and tells the process through the environment:
MLFLOW_TRACKING_URI (an ``azureml://`` URI, served by the azureml-mlflow plugin),
MLFLOW_RUN_ID (that run), MLFLOW_EXPERIMENT_NAME, and the older AZUREML_RUN_ID.
phitune's tracking code calls `azure_run_context()` and logs into that run
instead of opening a second one, which would split a job's metrics in two and
hide `full_valid_loss` from a sweep's primary-metric reader.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional


def azure_run_context(environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """{"tracking_uri", "run_id", "experiment"} inside an Azure ML job, else None.

    Detected by a run id (MLFLOW_RUN_ID, else AZUREML_RUN_ID) together with a
    tracking URI: a run id alone could be a user's leftover MLFLOW_RUN_ID, and
    without the URI there is nothing to log to. `experiment` may be None.
    """
    env = os.environ if environ is None else environ
    run_id = env.get("MLFLOW_RUN_ID") or env.get("AZUREML_RUN_ID")
    tracking_uri = env.get("MLFLOW_TRACKING_URI")
    in_azure = bool(env.get("AZUREML_RUN_ID")) or (tracking_uri or "").startswith("azureml:")
    if not (run_id and tracking_uri and in_azure):
        return None
    experiment = env.get("MLFLOW_EXPERIMENT_NAME") or env.get("AZUREML_ARM_PROJECT_NAME") or None
    return {"tracking_uri": tracking_uri, "run_id": run_id, "experiment": experiment}
