"""python eval.py model_uri=MODEL_URI data.test_file=FILE [overrides]   (conf/eval.yaml)

Scores a registered model (models:/NAME@ALIAS), a run's model (runs:/ID/model), or a
checkpoint (runs:/ID/checkpoints/epoch-002, or a local folder): teacher-forced loss,
perplexity and token accuracy, and greedy-generation exact match, token F1, ROUGE-L
and BLEU; logged to MLflow as a run tagged phitune.eval_of=<source run>.
"""
import sys

import hydra

import phitune.evaluation.config  # noqa: F401  (registers the structured config)


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg) -> float | None:
    from phitune.errors import PhituneError
    from phitune.evaluation.run import evaluate_model_uri, quiet_libraries

    quiet_libraries()
    try:
        return evaluate_model_uri(cfg)["metrics"].get("loss")
    except PhituneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
