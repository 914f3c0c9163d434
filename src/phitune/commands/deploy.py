"""`phitune deploy MODEL_URI --target azureml`: serve a registered model on an Azure ML managed online endpoint.

    phitune deploy models:/support-bot@champion --target azureml
    phitune deploy models:/support-bot/3 --target azureml --instance-type Standard_NC6s_v3 --instance-count 2
    phitune deploy models:/support-bot/3 --target azureml --dry-run      # YAML only, nothing sent

The workspace comes from conf/backend/azureml.yaml (AZURE_SUBSCRIPTION_ID,
AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME) or the flags below; credentials from
DefaultAzureCredential. Local serving is `phitune serve MODEL_URI`.
"""
from __future__ import annotations

import sys

from phitune.errors import PhituneError


def register(subparsers) -> None:
    p = subparsers.add_parser("deploy", help="deploy a registered model to an Azure ML managed online endpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("model_uri", metavar="MODEL_URI",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, azureml:NAME:VERSION or an MLflow model folder")
    p.add_argument("--target", choices=["azureml", "local"], default="azureml",
                   help="azureml (default); local serving is `phitune serve`")
    p.add_argument("--instance-type", help="VM size of each instance (default: Standard_NC6s_v3, 1x V100)")
    p.add_argument("--instance-count", type=int, default=1, metavar="N", help="instances behind the endpoint (default: 1)")
    p.add_argument("--endpoint-name", help="existing or new endpoint (default: <model>-<6 hex>, unique per region)")
    p.add_argument("--deployment-name", default="blue", help="deployment within the endpoint (default: blue)")
    p.add_argument("--dry-run", action="store_true", help="write endpoint.yaml and deployment.yaml; send nothing")
    p.add_argument("--output-dir", default="outputs/azure/deploy", help="where --dry-run writes (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow registry to resolve models:/ URIs in (default: sqlite:///mlruns/mlflow.db)")
    p.add_argument("--subscription-id", help="default: backend.subscription_id of conf/backend/azureml.yaml")
    p.add_argument("--resource-group", help="default: backend.resource_group")
    p.add_argument("--workspace", help="default: backend.workspace")
    p.set_defaults(func=_deploy)


def workspace_settings(args):
    """conf/backend/azureml.yaml (its ${oc.env:...} resolved), with the command-line flags on top."""
    from omegaconf import OmegaConf

    from phitune.azure.settings import backend_settings
    from phitune.confdir import conf_dir

    path = conf_dir() / "backend" / "azureml.yaml"
    node = OmegaConf.load(path) if path.is_file() else OmegaConf.create({"name": "azureml"})
    flags = {"subscription_id": args.subscription_id, "resource_group": args.resource_group, "workspace": args.workspace}
    node = OmegaConf.merge(node, {k: v for k, v in flags.items() if v})
    return backend_settings(node)


def _deploy(args) -> int:
    if args.target == "local":
        print(f"phitune deploy --target local: use `phitune serve {args.model_uri}` (it records the deployment too)",
              file=sys.stderr)
        return 2
    try:
        from phitune.azure.endpoint import deploy_azure
        from phitune.azure.settings import require_workspace

        settings = workspace_settings(args)
        if not args.dry_run:
            require_workspace(settings, "azureml")
        deploy_azure(args.model_uri, settings, instance_type=args.instance_type, instance_count=args.instance_count,
                     endpoint_name=args.endpoint_name, deployment_name=args.deployment_name, dry_run=args.dry_run,
                     output_dir=args.output_dir, tracking_uri=args.tracking_uri)
    except PhituneError as exc:
        print(f"phitune deploy: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
