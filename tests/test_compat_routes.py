"""The routes in other tools' shapes, over real HTTP: OpenRLHF's ``/get_reward``, vLLM's pooling
API (``/classify``, ``/pooling``, ``/v1/models``) and TEI's ``/predict``, on a real uvicorn server
on a free loopback port with the real demo reward model in its own process, compared with
``/score`` and with plain transformers forwards.

The shapes follow the tools' sources (see ``reward_service/compat.py``): vLLM 0.33
``vllm/entrypoints/pooling/{classify,pooling}/protocol.py`` and
``vllm/entrypoints/serve/engine/protocol.py`` (``ErrorResponse``, ``UsageInfo``, ``ModelCard``);
TEI ``router/src/http/types.rs`` (``PredictRequest``, ``PredictInput``, ``Prediction``) and
``router/src/http/server.rs`` (statuses); OpenRLHF ``openrlhf/utils/agent.py`` and
``openrlhf/utils/remote_rm_utils.py`` (the remote reward clients).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
import torch

from reward_service.app import create_app
from reward_service.compat import (
    sigmoid,
    softmax,
    tei_error,
    tei_inputs,
    vllm_activation,
    vllm_error,
)
from reward_service.errors import ApiError
from reward_service.settings import ServiceSettings
from tests.test_service import Reference, metric, serve, wait_ready

API_KEY = "compat-routes-key"
KEY = {"Authorization": f"Bearer {API_KEY}"}
SERVED = "demo-rm"
MAX_LENGTH = 24
MAX_ITEMS = 8
TEXTS = ["the movie was great .", "the plot was dull and the acting was awful ."]
LONG = "the music was lovely and the story was slow . " * 6  # > MAX_LENGTH tokens


@pytest.fixture(scope="module")
def reward_path(demo_models: Any) -> Path:
    return demo_models.reward


@pytest.fixture(scope="module")
def ref(reward_path: Path) -> Reference:
    return Reference(reward_path)


@pytest.fixture(scope="module")
def service(reward_path: Path) -> Iterator[str]:
    """Left truncation (the default) at 24 tokens, 8 items per request, an API key."""
    settings = ServiceSettings(
        model=str(reward_path), served_model_name=SERVED, api_key=API_KEY,
        max_length=MAX_LENGTH, max_items_per_request=MAX_ITEMS, max_body_bytes=100_000,
    )  # fmt: skip
    with serve(create_app(settings)) as url:
        wait_ready(url, headers=KEY)
        yield url


@pytest.fixture(scope="module")
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, headers=KEY, timeout=30) as c:
        yield c


def scores(client: httpx.Client, texts: list[str]) -> list[float]:
    """What ``/score`` answers for ``texts`` (itself checked against transformers elsewhere)."""
    response = client.post("/score", json={"items": [{"text": t} for t in texts]})
    assert response.status_code == 200, response.text
    return response.json()["scores"]


def cut(ids: list[int], side: str, n: int) -> list[int]:
    """The demo tokenizer's BOS stays; left keeps the end, right the start."""
    return [ids[0], *ids[-(n - 1) :]] if side == "left" else ids[:n]


def vllm_error_body(response: httpx.Response, status: int, type_: str, *fragments: str) -> dict:
    """vLLM's error shape (since v0.10.1): ``{"error": {message, type, param, code}}``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == type_ and body["error"]["code"] == status, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], (fragment, body)
    return body["error"]


def tei_error_body(response: httpx.Response, status: int, type_: str, *fragments: str) -> None:
    """TEI's error shape: ``{"error": message, "error_type": PascalCase}``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == type_, body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body)


# ----------------------------------------------------------------------------- OpenRLHF
def test_get_reward_answers_openrlhf_remote_reward_clients(
    service: str, client: httpx.Client, ref: Reference
) -> None:
    """The bodies exactly as OpenRLHF builds them:

    - v0.9.1+ (``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor._fetch_rewards_via_http``):
      one sample per request, ``{"query": [q], "prompts": [p], "labels": [label]}`` where ``q``
      is ``tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False)`` and ``p`` the
      chat-templated prompt; the answer is read with ``.get("rewards")``, ``.get("scores")``,
      ``.get("extra_logs")``. With several URLs, every URL after the first gets empty lists.
    - v0.8.x (``openrlhf/utils/remote_rm_utils.py``, ``request_api_wrapper``): the whole batch,
      ``requests.post(url=url, json=data, headers={"Content-Type": "application/json"},
      timeout=180)`` with ``data = {"query": queries, "prompts": prompts, "labels": labels}``.

    OpenRLHF sends no API key header; the service is started with one here, so the test adds
    it (a key-less service answers the bodies alike)."""
    tokenizer = ref.tokenizer
    prompts, queries = [], []
    for review in TEXTS:
        chat = [{"role": "user", "content": "review the movie"}]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        action_ids = tokenizer(" " + review, add_special_tokens=False)["input_ids"]
        action_ids.append(tokenizer.eos_token_id)  # a response that stopped at EOS
        prompts.append(prompt)
        queries.append(tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False))
    expected = scores(client, queries)
    # The query carries the template's BOS: it is not given a second one.
    assert queries[0].startswith(tokenizer.bos_token)
    assert expected[0] == pytest.approx(ref.score(queries[0]), abs=1e-5)
    url = f"{service}/get_reward"
    for query, prompt, want in zip(queries, prompts, expected, strict=True):
        response = httpx.post(
            url, json={"query": [query], "prompts": [prompt], "labels": [""]}, headers=KEY
        )
        response.raise_for_status()
        rewards_info = response.json()
        assert rewards_info.get("rewards") == pytest.approx([want], abs=1e-5)
        assert rewards_info.get("scores") == rewards_info.get("rewards")
        assert (rewards_info.get("extra_logs") or {}) == {}
    shard = httpx.post(url, json={"query": [], "prompts": [], "labels": []}, headers=KEY)
    assert shard.status_code == 200
    assert shard.json() == {"rewards": [], "scores": [], "extra_logs": {}}
    data = {"query": queries, "prompts": prompts, "labels": ["4", None]}  # labels: any JSON
    batch = requests.post(
        url=url, json=data, headers={"Content-Type": "application/json", **KEY}, timeout=180
    )
    batch.raise_for_status()
    assert batch.json()["rewards"] == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- vLLM
def test_classify_answers_vllms_shape_raw_by_default(client: httpx.Client, ref: Reference) -> None:
    raw = scores(client, TEXTS)
    response = client.post("/classify", json={"model": SERVED, "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("classify-") and body["object"] == "list"
    assert body["model"] == SERVED and isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == [0, 1]
    for item, want in zip(body["data"], raw, strict=True):
        assert item["label"] == "LABEL_0" and item["num_classes"] == 1
        assert item["probs"] == pytest.approx([want], abs=1e-5)  # raw logits, as /score
    tokens = sum(len(ref.ids(t)) for t in TEXTS)
    assert body["usage"] == {
        "prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
        "prompt_tokens_details": None, "completion_tokens_details": None,
    }  # fmt: skip
    # vLLM's activation on request (sigmoid for one label), also under its older names.
    for switch in ({"use_activation": True}, {"activation": True}, {"softmax": True}):
        one = client.post("/classify", json={"input": TEXTS[0], **switch}).json()
        assert one["data"][0]["probs"] == pytest.approx([sigmoid(raw[0])], abs=1e-6)
    off = client.post("/classify", json={"input": TEXTS[0], "use_activation": False}).json()
    assert off["data"][0]["probs"] == pytest.approx([raw[0]], abs=1e-5)
    named = client.post("/classify", json={"input": "a", "request_id": "r1"}).json()
    assert named["id"] == "classify-r1"
    header = client.post("/classify", json={"input": "a"}, headers={"X-Request-Id": "h2"})
    assert header.json()["id"] == "classify-h2"


def test_classify_renders_messages_with_the_reward_chat_template(
    client: httpx.Client, ref: Reference
) -> None:
    messages = [
        {"role": "user", "content": "the acting"},
        {"role": "assistant", "content": [{"type": "text", "text": "was superb ."}]},
    ]
    plain = [{"role": "user", "content": "the acting"}, {"role": "assistant",
                                                         "content": "was superb ."}]  # fmt: skip
    rendered = ref.tokenizer.apply_chat_template(plain, tokenize=False)
    response = client.post("/classify", json={"messages": messages})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 1
    assert body["data"][0]["probs"] == pytest.approx([ref.score(rendered)], abs=1e-5)
    assert body["usage"]["prompt_tokens"] == len(ref.ids(rendered))


@pytest.mark.parametrize(("route", "prefix"), [("/classify", "classify"), ("/pooling", "pooling")])
def test_vllm_truncation_settings(
    client: httpx.Client, ref: Reference, route: str, prefix: str
) -> None:
    full = ref.ids(LONG)
    assert len(full) > MAX_LENGTH
    # No truncate_prompt_tokens: over-long is vLLM's 400, naming the prompt and its length.
    error = vllm_error_body(
        client.post(route, json={"input": ["a", LONG]}), 400, "BadRequestError",
        "input[1]:", "maximum context length is 24 tokens", f"contains {len(full)} input tokens",
    )  # fmt: skip
    assert error["param"] == "input_tokens"
    too_big = client.post(route, json={"input": LONG, "truncate_prompt_tokens": MAX_LENGTH + 1})
    assert vllm_error_body(too_big, 400, "BadRequestError")["param"] == "truncate_prompt_tokens"
    for tokens, side, kept in [
        (-1, None, cut(full, "left", MAX_LENGTH)),  # the model's limit, the service's side
        (-1, "right", cut(full, "right", MAX_LENGTH)),
        (10, "left", cut(full, "left", 10)),
        (10, "right", cut(full, "right", 10)),
    ]:
        body = {"input": [LONG], "truncate_prompt_tokens": tokens, "truncation_side": side}
        response = client.post(route, json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"].startswith(f"{prefix}-")
        values = answer["data"][0]["probs" if prefix == "classify" else "data"]
        assert values == pytest.approx(ref.logits_of_ids(kept), abs=1e-5)
        assert answer["usage"]["prompt_tokens"] == len(kept)


def test_pooling_floats_and_base64(client: httpx.Client) -> None:
    raw = scores(client, TEXTS)
    floats = client.post("/pooling", json={"input": TEXTS}).json()
    assert floats["object"] == "list" and floats["model"] == SERVED
    assert [d["object"] for d in floats["data"]] == ["pooling", "pooling"]
    assert [d["data"][0] for d in floats["data"]] == pytest.approx(raw, abs=1e-5)
    activated = client.post("/pooling", json={"input": TEXTS, "use_activation": True}).json()
    assert [d["data"][0] for d in activated["data"]] == pytest.approx(
        [sigmoid(x) for x in raw], abs=1e-6
    )
    for dtype, endianness, numpy_dtype in [
        ("float32", "native", "<f4"), ("float32", "big", ">f4"), ("float16", "little", "<f2"),
    ]:  # fmt: skip
        body = {"input": TEXTS, "encoding_format": "base64", "embed_dtype": dtype,
                "endianness": endianness}  # fmt: skip
        encoded = client.post("/pooling", json=body).json()["data"]
        decoded = [np.frombuffer(base64.b64decode(d["data"]), numpy_dtype)[0] for d in encoded]
        assert decoded == pytest.approx(raw, abs=1e-5 if dtype == "float32" else 1e-3)
    bf16 = {"input": TEXTS[:1], "encoding_format": "base64", "embed_dtype": "bfloat16"}
    bits = np.frombuffer(base64.b64decode(client.post("/pooling", json=bf16).json()["data"][0][
        "data"]), "<u2")  # fmt: skip
    as_float = torch.tensor(bits.astype(np.int32) << 16, dtype=torch.int32).view(torch.float32)
    assert as_float.item() == pytest.approx(raw[0], rel=1e-2)


def test_models_lists_the_served_model(client: httpx.Client, reward_path: Path) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert (card["id"], card["object"], card["owned_by"]) == (SERVED, "model", "vllm")
    assert card["root"] == str(reward_path) and card["max_model_len"] == MAX_LENGTH
    assert card["parent"] is None and card["permission"][0]["object"] == "model_permission"


VLLM_BAD: list[tuple[str, Any, int, str, tuple[str, ...]]] = [
    # (name, body (bytes: sent raw), status, vLLM type, message fragments)
    ("not-json", b'{"input": ', 400, "Bad Request", ("not valid JSON",)),
    ("not-utf8", b'{"input": "\xff"}', 400, "Bad Request", ("UTF-8",)),
    ("no-input", {"model": SERVED}, 400, "Bad Request", ("either 'input'",)),
    ("both-forms", {"input": "a", "messages": [{"role": "user", "content": "b"}]}, 400,
     "Bad Request", ("either 'input'",)),
    ("input-number", {"input": 5}, 400, "Bad Request", ("input",)),
    ("input-of-numbers", {"input": [1, 2]}, 400, "Bad Request", ("input",)),
    ("empty-input", {"input": []}, 400, "BadRequestError", ("at least one prompt",)),
    ("empty-messages", {"messages": []}, 400, "Bad Request", ("'messages' must not be empty",)),
    ("message-without-role", {"messages": [{"content": "a"}]}, 400, "Bad Request",
     ("messages[0].role",)),
    ("both-template-switches", {"messages": [{"role": "user", "content": "a"}],
                                "add_generation_prompt": True, "continue_final_message": True},
     400, "Bad Request", ("cannot both be true",)),
    ("wrong-model", {"input": "a", "model": "gpt-4"}, 404, "NotFoundError",
     ("The model `gpt-4` does not exist.",)),
    ("too-many-inputs", {"input": ["a"] * (MAX_ITEMS + 1)}, 413, "Payload Too Large",
     (f"max_items_per_request {MAX_ITEMS}",)),
    ("truncate-below-minus-one", {"input": "a", "truncate_prompt_tokens": -2}, 400,
     "Bad Request", ("truncate_prompt_tokens",)),
    ("truncate-to-nothing", {"input": LONG, "truncate_prompt_tokens": 1}, 400, "Bad Request",
     ("input[0]:", "no room"),),
    ("bad-truncation-side", {"input": "a", "truncation_side": "middle"}, 400, "Bad Request",
     ("truncation_side",)),
    ("removed-normalize", {"input": "a", "normalize": False}, 400, "BadRequestError",
     ("`normalize` was removed",)),
]  # fmt: skip
POOLING_BAD: list[tuple[str, Any, int, str, tuple[str, ...]]] = [
    ("task-embed", {"input": "a", "task": "embed"}, 400, "BadRequestError", ("'embed'",)),
    ("task-removed", {"input": "a", "task": "score"}, 400, "BadRequestError", ("removed",)),
    ("bytes-format", {"input": "a", "encoding_format": "bytes"}, 400, "BadRequestError",
     ("not supported",)),
    ("fp8", {"input": "a", "encoding_format": "base64", "embed_dtype": "fp8_e4m3"}, 400,
     "BadRequestError", ("embed_dtype",)),
    ("dimensions", {"input": "a", "dimensions": 4}, 400, "BadRequestError", ("dimensions",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "body", "status", "type_", "fragments"),
    [("/classify", *case[1:]) for case in VLLM_BAD]
    + [("/pooling", *case[1:]) for case in VLLM_BAD + POOLING_BAD],
    ids=[f"classify-{c[0]}" for c in VLLM_BAD]
    + [f"pooling-{c[0]}" for c in VLLM_BAD + POOLING_BAD],
)
def test_vllm_routes_reject_bad_requests_in_vllms_shape(
    client: httpx.Client, route: str, body: Any, status: int, type_: str, fragments: tuple[str]
) -> None:
    if isinstance(body, bytes):
        response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(route, json=body)
    vllm_error_body(response, status, type_, *fragments)


def test_vllm_routes_reject_a_non_json_content_type_with_400(client: httpx.Client) -> None:
    response = client.post("/classify", content=b"input=a", headers={"Content-Type": "text/plain"})
    vllm_error_body(response, 400, "Bad Request", "application/json")


# ----------------------------------------------------------------------------- TEI
def test_predict_answers_teis_shapes(client: httpx.Client, ref: Reference) -> None:
    raw = scores(client, TEXTS)
    single = client.post("/predict", json={"inputs": TEXTS[0]})
    assert single.status_code == 200, single.text
    assert single.json() == [{"score": pytest.approx(sigmoid(raw[0]), abs=1e-6),
                              "label": "LABEL_0"}]  # fmt: skip
    as_list = client.post("/predict", json={"inputs": [TEXTS[0]], "raw_scores": True}).json()
    assert as_list == [{"score": pytest.approx(raw[0], abs=1e-5), "label": "LABEL_0"}]
    # Two strings are one (text, text_pair) pair, encoded with the tokenizer's pair template.
    pair_ids = ref.tokenizer(TEXTS[0], TEXTS[1])["input_ids"]
    pair = client.post("/predict", json={"inputs": TEXTS, "raw_scores": True}).json()
    assert pair == [{"score": pytest.approx(ref.logits_of_ids(pair_ids)[0], abs=1e-5),
                     "label": "LABEL_0"}]  # fmt: skip
    batch = client.post("/predict", json={"inputs": [[TEXTS[0]], TEXTS, [TEXTS[1]]]}).json()
    assert len(batch) == 3 and all(len(entry) == 1 for entry in batch)
    assert [entry[0]["score"] for entry in batch] == pytest.approx(
        [sigmoid(raw[0]), sigmoid(ref.logits_of_ids(pair_ids)[0]), sigmoid(raw[1])], abs=1e-6
    )


def test_predict_truncation_settings(client: httpx.Client, ref: Reference) -> None:
    full = ref.ids(LONG)
    tei_error_body(
        client.post("/predict", json={"inputs": LONG, "truncate": False}), 422, "Validation",
        f"must have less than {MAX_LENGTH} tokens. Given: {len(full)}",
    )  # fmt: skip
    for options, kept in [
        ({}, cut(full, "left", MAX_LENGTH)),  # TEI >= 1.9 truncates; on the service's side
        ({"truncate": True}, cut(full, "left", MAX_LENGTH)),
        ({"truncate": True, "truncation_direction": "Right"}, cut(full, "right", MAX_LENGTH)),
        ({"truncate": True, "truncation_direction": "right"}, cut(full, "right", MAX_LENGTH)),
        ({"truncation_direction": "Left"}, cut(full, "left", MAX_LENGTH)),
    ]:
        body = {"inputs": [[LONG]], "raw_scores": True, **options}
        response = client.post("/predict", json=body)
        assert response.status_code == 200, (options, response.text)
        assert response.json()[0][0]["score"] == pytest.approx(
            ref.logits_of_ids(kept)[0], abs=1e-5
        ), options


TEI_BAD: list[tuple[str, Any, int, str, tuple[str, ...]]] = [
    ("not-json", b'{"inputs": ', 400, "Validation", ("not valid JSON",)),
    ("no-inputs", {"raw_scores": True}, 422, "Validation", ("inputs: Field required",)),
    ("inputs-number", {"inputs": 5}, 422, "Validation", ("inputs",)),
    ("empty-list", {"inputs": []}, 422, "Validation", ("inputs: must not be empty",)),
    ("three-strings", {"inputs": ["a", "b", "c"]}, 422, "Validation", ("got 3 strings",)),
    ("batch-entry-of-three", {"inputs": [["a"], ["a", "b", "c"]]}, 422, "Validation",
     ("inputs[1]:",)),
    ("empty-text", {"inputs": ""}, 400, "Empty", ("`inputs` cannot be empty",)),
    ("empty-text-in-batch", {"inputs": [["a"], [""]]}, 400, "Empty", ("inputs[1]",)),
    ("too-many-inputs", {"inputs": [["a"]] * (MAX_ITEMS + 1)}, 422, "Validation",
     (f"max_items_per_request {MAX_ITEMS}",)),
    ("bad-direction", {"inputs": "a", "truncation_direction": "middle"}, 422, "Validation",
     ("truncation_direction",)),
    ("raw-scores-word", {"inputs": "a", "raw_scores": "maybe"}, 422, "Validation",
     ("raw_scores",)),
    ("body-too-large", {"inputs": "great " * 20_000}, 413, "Validation", ("max_body_bytes",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "type_", "fragments"), [c[1:] for c in TEI_BAD], ids=[c[0] for c in TEI_BAD]
)
def test_predict_rejects_bad_requests_in_teis_shape(
    service: str, body: Any, status: int, type_: str, fragments: tuple[str]
) -> None:
    # A fresh connection each: a 413 closes the one it came on.
    with httpx.Client(base_url=service, headers=KEY, timeout=30) as fresh:
        if isinstance(body, bytes):
            headers = {"Content-Type": "application/json"}
            response = fresh.post("/predict", content=body, headers=headers)
        else:
            response = fresh.post("/predict", json=body)
    tei_error_body(response, status, type_, *fragments)


# ----------------------------------------------------------------------------- all of them
def test_new_routes_need_the_key_are_counted_and_never_answered_5xx(
    service: str, client: httpx.Client
) -> None:
    valid = {"/classify": {"input": "a"}, "/pooling": {"input": "a"},
             "/predict": {"inputs": "a"}, "/get_reward": {"query": ["a"]}}  # fmt: skip
    for route, body in valid.items():
        before = metric(service, f'reward_requests_total{{route="{route}",status="200"}}')
        response = httpx.post(f"{service}{route}", json=body)
        assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"
        assert client.post(route, json=body).status_code == 200
        after = metric(service, f'reward_requests_total{{route="{route}",status="200"}}')
        assert after == before + 1
    assert httpx.get(f"{service}/v1/models").status_code == 401
    assert metric(service, 'reward_errors_total{type="model_not_found"}') >= 1
    # No 5xx on any route but /ready (503 while loading), after every test above.
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("reward_requests_total{") and 'status="5' in line:
            assert 'route="/ready"' in line, line


# ----------------------------------------------------------------------------- pure parts
def test_activations() -> None:
    assert sigmoid(0.0) == 0.5 and sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0
    assert sigmoid(-2.0) == pytest.approx(1 / (1 + math.exp(2.0)))
    assert softmax([1000.0, 1000.0]) == [0.5, 0.5]
    assert vllm_activation([2.0], None) == [sigmoid(2.0)]
    assert vllm_activation([2.0], "regression") == [2.0]
    assert vllm_activation([1.0, 2.0], None) == pytest.approx(softmax([1.0, 2.0]))
    assert vllm_activation([1.0, 2.0], "multi_label_classification") == [
        sigmoid(1.0), sigmoid(2.0),
    ]  # fmt: skip


def test_tei_inputs_forms() -> None:
    assert tei_inputs("a") == (["a"], False)
    assert tei_inputs(["a"]) == (["a"], False)
    assert tei_inputs(["a", "b"]) == ([("a", "b")], False)
    assert tei_inputs([["a"], ["b", "c"]]) == (["a", ("b", "c")], True)


@pytest.mark.parametrize(
    ("error", "tei", "vllm"),
    [
        (ApiError(429, "queue_full", "queue full", {"Retry-After": "3"}), (429, "Overloaded"),
         (429, "Too Many Requests")),
        (ApiError(413, "too_many_items", "9 items"), (422, "Validation"),
         (413, "Payload Too Large")),
        (ApiError(503, "loading", "loading"), (503, "Unhealthy"), (503, "Service Unavailable")),
        (ApiError(500, "inference_error", "failed"), (424, "Backend"),
         (500, "InternalServerError")),
        (ApiError(422, "validation_error", "x: bad", param="x"), (422, "Validation"),
         (400, "Bad Request")),
    ],
)  # fmt: skip
def test_error_shapes_map_statuses_as_the_tools_do(
    error: ApiError, tei: tuple[int, str], vllm: tuple[int, str]
) -> None:
    tei_response, vllm_response = tei_error(error), vllm_error(error)
    tei_body, vllm_body = json.loads(tei_response.body), json.loads(vllm_response.body)
    assert (tei_response.status_code, tei_body["error_type"]) == tei
    assert tei_body["error"] == error.message
    assert (vllm_response.status_code, vllm_body["error"]["type"]) == vllm
    assert vllm_body["error"]["code"] == vllm[0] and vllm_body["error"]["param"] == error.param
    if "Retry-After" in error.headers:
        assert tei_response.headers["retry-after"] == vllm_response.headers["retry-after"] == "3"
