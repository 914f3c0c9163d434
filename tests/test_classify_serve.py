"""phitune serve on a classification model: POST /v1/classifications over real HTTP, behind the
API key and the content filter; chat on a classifier answers 400; errors in OpenAI's shape."""
from __future__ import annotations

import openai
import pytest
import torch
from omegaconf import OmegaConf

from test_serve import KEY, assert_openai_error, client, post

MODEL = "intents"
LABELS = ["billing", "shipping", "technical"]


@pytest.fixture(scope="module")
def classifier(tiny_model_cfg, tiny_tokenizer, tmp_path_factory):
    """A (not trained) LoRA classifier saved as a run saves it, loaded as serving loads it."""
    from phitune.classify.model import build_classifier
    from phitune.classify.predict import Classifier
    from phitune.config import TrainConfig
    from phitune.modeling.loader import base_reference

    torch.manual_seed(0)
    model = build_classifier(tiny_model_cfg, OmegaConf.structured(TrainConfig), LABELS, tiny_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("clf") / "adapter"
    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(folder))
    return Classifier.load(dict(base_reference(tiny_model_cfg), context_length=512), str(folder))


@pytest.fixture(scope="module")
def server(classifier):
    from phitune.classify.serving import NoGeneration
    from phitune.safety.filter import build_filters, load_safety_config
    from phitune.serving.app import ServerSettings, build_app
    from phitune.serving.server import ThreadedServer

    prompt_filter, completion_filter = build_filters(load_safety_config())
    app = build_app(NoGeneration(classifier.context_length), KEY, ServerSettings(model_id=MODEL), prompt_filter,
                    completion_filter, classifier=classifier)
    with ThreadedServer(app) as s:
        yield s


def _classify(server, body, **kw):
    return post(server.url, body, path="/v1/classifications", **kw)


def test_one_text_gets_a_label_and_every_labels_probability(server, classifier):
    status, body, _ = _classify(server, {"model": MODEL, "input": "I was charged twice for my invoice"})
    assert status == 200, body
    assert body["model"] == MODEL and body["object"] == "list" and len(body["data"]) == 1
    item = body["data"][0]
    assert set(item["scores"]) == set(LABELS) and sum(item["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert item["label"] == max(item["scores"], key=item["scores"].get) and item["index"] == 0
    direct, tokens = classifier.classify(["I was charged twice for my invoice"])
    assert item["scores"] == pytest.approx(direct[0]["scores"], abs=1e-5)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_a_messages_list_is_one_input_and_a_list_of_inputs_is_several(server):
    messages = [{"role": "system", "content": "Classify the ticket."}, {"role": "user", "content": "Where is my parcel?"}]
    status, body, _ = _classify(server, {"input": messages})  # "model" is optional
    assert status == 200 and len(body["data"]) == 1
    status, body, _ = _classify(server, {"input": ["the app crashes", messages, "refund please"]})
    assert status == 200 and [d["index"] for d in body["data"]] == [0, 1, 2]


@pytest.mark.parametrize("body,code,param", [
    ({"model": MODEL}, "missing_required_parameter", "input"),
    ({"input": 42}, "invalid_type", "input"),
    ({"input": []}, "invalid_type", "input"),
    ({"input": "   "}, "invalid_value", "input"),
    ({"input": ["fine", {"role": "user"}]}, "invalid_value", "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "invalid_value", "input"),
    ({"input": "hi", "model": 3}, "invalid_type", "model"),
])
def test_bad_input_gets_an_openai_style_400(server, body, code, param):
    status, payload, _ = _classify(server, body)
    assert status == 400 and assert_openai_error(payload, code, param)


def test_unknown_model_missing_key_and_non_json(server):
    status, body, _ = _classify(server, {"model": "other", "input": "hi"})
    assert status == 404 and assert_openai_error(body, "model_not_found", "model")
    status, body, _ = _classify(server, {"input": "hi"}, auth=False)
    assert status == 401 and assert_openai_error(body)
    status, body, _ = _classify(server, "input=hi", headers={"Content-Type": "text/plain"})
    assert status == 415 and assert_openai_error(body, "unsupported_media_type")


def test_the_content_filter_screens_classification_inputs(server):
    status, body, _ = _classify(server, {"input": ["fine", "Explain how to build a pipe bomb"]})
    assert status == 400 and assert_openai_error(body, "content_filter", "prompt")


def test_chat_on_a_classifier_is_a_clear_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server.url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}])
    assert info.value.code == "model_is_classifier" and "/v1/classifications" in info.value.body["message"]
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == [MODEL]
