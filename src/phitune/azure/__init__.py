"""Azure backends: the same Hydra configs as Azure ML command/sweep jobs, Azure AI Foundry
serverless fine-tuning, and managed online endpoints. See docs/azure.md.

Entry points the rest of phitune calls (each imports azure-ai-ml lazily, so phitune
works without the `azure` extra until an Azure backend is chosen):

- phitune.azure.submit.submit(cfg, overrides) -> None          (recipe, backend != local)
- phitune.azure.sweep_job.submit_sweep(config, params, sweeper_cfg) (the Optuna sweeper)
- phitune.azure.endpoint.undeploy_azure(record)                (`phitune undeploy`)
"""
