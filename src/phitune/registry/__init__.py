"""From finished runs to registered model versions: compare, promote (gated), models.

`store` finds runs (an experiment, a sweep's trials, one run) and their states;
`compare` ranks them; `promote` registers the best one and moves @champion only
when it beats the current champion on the same validation data; `models` lists,
shows and deletes registered models, refusing to delete what is deployed.
Everything goes through MlflowClient (no active fluent run needed), except logging
a checkpoint's model into its source run.
"""
