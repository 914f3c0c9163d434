"""phitune.tracking.context.azure_run_context: reuse the MLflow run Azure ML opened for the job."""
from __future__ import annotations

import pytest

from phitune.tracking.context import azure_run_context

AZ_URI = "azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/s/resourceGroups/rg/providers/" \
         "Microsoft.MachineLearningServices/workspaces/ws"


@pytest.mark.parametrize("env, want", [
    ({}, None),
    # Inside an Azure ML job: the run Azure opened, its tracking URI and experiment.
    ({"MLFLOW_TRACKING_URI": AZ_URI, "MLFLOW_RUN_ID": "run-1", "MLFLOW_EXPERIMENT_NAME": "phitune",
      "AZUREML_RUN_ID": "run-1"}, {"tracking_uri": AZ_URI, "run_id": "run-1", "experiment": "phitune"}),
    # Older images set only AZUREML_RUN_ID next to the tracking URI.
    ({"MLFLOW_TRACKING_URI": AZ_URI, "AZUREML_RUN_ID": "run-2"},
     {"tracking_uri": AZ_URI, "run_id": "run-2", "experiment": None}),
    # A user's local MLflow settings are not an Azure job.
    ({"MLFLOW_TRACKING_URI": "sqlite:///mlruns/mlflow.db", "MLFLOW_RUN_ID": "abc"}, None),
    ({"MLFLOW_TRACKING_URI": AZ_URI}, None),  # no run id: nothing to reuse
    ({"AZUREML_RUN_ID": "run-3"}, None),  # no tracking URI: nothing to log to
])
def test_azure_run_context(env, want):
    assert azure_run_context(env) == want


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", AZ_URI)
    monkeypatch.setenv("MLFLOW_RUN_ID", "run-9")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("AZUREML_ARM_PROJECT_NAME", raising=False)
    assert azure_run_context() == {"tracking_uri": AZ_URI, "run_id": "run-9", "experiment": None}


def test_importing_it_does_not_import_the_azure_sdk():
    import subprocess
    import sys

    code = "import sys, phitune.tracking.context; print('azure.ai.ml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
