"""The LLM judge against the loopback server: verdicts per row, agreement with the
keyword scorer, unparseable answers, the cache, empty predictions, failing fast."""

from __future__ import annotations

import functools
import json
import logging
import re
import socket
import threading

import pytest
from llm_server import loopback_cfg

from raypipe.errors import ConfigError, EndpointError
from raypipe.evaluate.judge import (
    JUDGE_MAX_TOKENS,
    judge_prompt,
    judge_request,
    judge_rows,
    judge_summary,
    parse_judgement,
)
from raypipe.evaluate.report import score_rows, scores
from raypipe.evaluate.score import agreement
from raypipe.llm.client import OpenAIBackend

KEY_ENV = "RAYPIPE_TEST_JUDGE_KEY"
SENTINEL = "sk-raypipe-JUDGE-SENTINEL-4d2b8e"
UNPARSEABLE = "UNPARSEABLE"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    return SENTINEL


make_cfg = functools.partial(
    loopback_cfg, api_key_env=KEY_ENV, concurrency=8, max_attempts=2, timeout_s=2.0,
    backoff_initial_s=0.01, backoff_max_s=0.05,
)  # fmt: skip


def field(messages: list[dict], name: str) -> str | None:
    match = re.search(rf"^{re.escape(name)}: (.*)$", messages[-1]["content"], re.M)
    return match.group(1) if match else None


class KeywordJudge:
    """Grades as a naive judge: 1 when a reference keyword is in the answer's text.

    Counts the prompts it graded and the endpoint check's probes it answered."""

    def __init__(self) -> None:
        self.graded = 0
        self.probes = 0
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict]) -> str:
        answer = field(messages, "Model's answer")
        with self._lock:
            if answer is None:
                self.probes += 1
                return "pong"
            self.graded += 1
        answer = answer.lower()
        if UNPARSEABLE.lower() in answer:
            return "I cannot grade this answer."
        reference = re.sub(r"^(any one of|all of): ", "", field(messages, "Reference answer"))
        return "1" if any(k.strip().lower() in answer for k in reference.split(",")) else "0"


def row(ident, prediction, keywords, question_type="wh", question="What is it?", **extra):
    return {
        "id": ident,
        "model": "tuned",
        "benchmark": "synthetic",
        "ability": extra.pop("ability", "color"),
        "question": question,
        "question_type": question_type,
        "answer_keywords": keywords,
        "prediction": prediction,
        **extra,
    }


# Planted cases: (row, keyword verdict, judge verdict).
PLANTED = [
    (row("a", "The car is red.", ["red"], question="What colour is the car?"), True, True),
    (row("b", "It is blue.", ["red"], question="What colour is the car?"), False, False),
    # The keyword scorer knows negation; the naive judge does not: they disagree.
    (row("c", "It is not red, it is blue.", ["red"]), False, True),
    # The keyword scorer knows the item's synonyms; the naive judge does not.
    (
        row("d", "A couch.", ["sofa"], synonyms={"sofa": ["couch"]}, ability="object"),
        True,
        False,
    ),
    (row("e", "Yes, it is.", ["yes"], "yes_no", "Is the car red?"), True, True),
    (row("f", "Red.", ["red"], "either_or", "Is the car red or blue?"), True, True),
    # The judge answers something with no verdict in it: None, not counted.
    (row("g", f"{UNPARSEABLE}: a dog", ["dog"], ability="animal"), True, None),
    # Empty predictions: judged wrong without a request.
    (row("h", "", ["dog"], ability="animal"), False, False),
    (row("i", None, ["dog"], ability="animal"), False, False),
]


# ---------------------------------------------------------------------------------------
# The prompt and the judge's answer
# ---------------------------------------------------------------------------------------


def test_prompt_holds_question_reference_options_answer_and_rubric():
    item = row(
        "x",
        "It looks\n  crimson to me.",
        ["red"],
        "either-or",
        "Is the car red or light blue?",
        synonyms={"red": ["crimson", "scarlet"]},
    )
    system, user = judge_prompt(item)
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert "Question: Is the car red or light blue?" in text
    assert "Reference answer: red" in text
    assert "Options: red | light blue" in text  # parsed from the question
    assert "Also accepted: crimson, scarlet (for red)" in text
    assert "Model's answer: It looks crimson to me." in text  # on one line
    assert "exactly 1" in text and "0 if it is wrong" in text
    assert "hedge" in text and "exactly one option" in text and "plurals" in text

    given = judge_prompt({**item, "options": ["red", "sky blue"]})[1]["content"]
    assert "Options: red | sky blue" in given
    several = judge_prompt(row("y", "x", ["cat", "kitten"]))[1]["content"]
    assert "Reference answer: any one of: cat, kitten" in several
    both = judge_prompt(row("z", "x", ["cat", "dog"], match="all"))[1]["content"]
    assert "Reference answer: all of: cat, dog" in both
    yes_no = judge_prompt(row("w", "Yes.", ["yes"], "Yes/No", "Is it red?"))[1]["content"]
    assert "Question type: yes/no" in yes_no and "Reference answer: yes" in yes_no
    assert "Options:" not in yes_no


def test_request_names_are_stable_and_requests_deterministic():
    item = PLANTED[0][0]
    first, again = judge_request(item, "judge-a"), judge_request(dict(item), "judge-a")
    assert first.key == again.key and first.key.startswith("judge/tuned/a/")
    assert first.messages == again.messages
    assert first.temperature == 0.0 and first.max_tokens == JUDGE_MAX_TOKENS
    others = [
        judge_request({**item, "prediction": "It is red."}, "judge-a"),
        judge_request({**item, "model": "base"}, "judge-a"),
        judge_request({**item, "id": "a2"}, "judge-a"),
        judge_request(item, "judge-b"),
    ]
    assert len({first.key, *(r.key for r in others)}) == 5


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("1", True),
        ("0", False),
        (" 1\n", True),
        ("0.", False),
        ("Score: 1", True),
        ("score = 0", False),
        ("**1**", True),
        ("`0`", False),
        ("[1]", True),
        ("1/1", True),
        ("0 - the answer names blue", False),
        ("Correct", True),
        ("Correct.", True),
        ("Incorrect", False),
        ("Wrong: it says blue.", False),
        ("Yes", True),
        ("no", False),
        ("The answer is correct.", True),
        ("The answer is not correct.", False),
        ("The answer isn't correct.", False),
        ("The model is wrong; the correct answer is red.", False),
        ("The answer names red, which matches.\nVerdict: 1", True),
        ("The answer names blue.\n0", False),
        ("<think>The reference is red and the answer says red.</think>1", True),
        ("I cannot grade this answer.", None),
        ("1. The question asks", None),
        ("Score: 0.5", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_parse_judgement(text, verdict):
    assert parse_judgement(text) is verdict


# ---------------------------------------------------------------------------------------
# Judging rows against the loopback server
# ---------------------------------------------------------------------------------------


def test_verdicts_agreement_unparseable_cache_and_no_key_anywhere(llm_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    judge = KeywordJudge()
    server = llm_server(responder=judge, api_key=SENTINEL)
    cfg = make_cfg(server.url)
    rows = [r for r, _, _ in PLANTED]
    judged = judge_rows(rows, cfg, tmp_path / "cache")

    # One request per non-empty prediction (and the endpoint check's probe); the rows
    # come back in order, inputs kept.
    assert (judge.graded, judge.probes, server.total_requests) == (7, 1, 8)
    assert server.stats()["unauthorized"] == 0
    assert [r["id"] for r in judged] == [r["id"] for r in rows]
    assert all(r[k] == j[k] for r, j in zip(rows, judged) for k in r)
    assert "judge_correct" not in rows[0]  # the input rows are not changed
    for (item, _, judge), out in zip(PLANTED, judged):
        assert out["judge_correct"] is judge, item["id"]
        assert out["judge_model"] == "test-model" and out["judge_error"] is None
    by_id = {r["id"]: r for r in judged}
    assert by_id["a"]["judge_raw"] == "1" and by_id["b"]["judge_raw"] == "0"
    assert by_id["g"]["judge_raw"] == "I cannot grade this answer."  # kept for review
    assert by_id["h"]["judge_raw"] is None and by_id["i"]["judge_raw"] is None

    # Agreement with the keyword scorer, over the rows both judged: 6 of 8.
    scored = score_rows(judged)
    assert [r["correct"] for r in scored] == [kw for _, kw, _ in PLANTED]
    expected = 6 / 8
    assert agreement(
        [r["correct"] for r in scored], [r["judge_correct"] for r in scored]
    ) == pytest.approx(expected)
    summary = judge_summary(scored)
    assert summary == {
        "rows": 9,
        "judged": 8,
        "correct": 4,
        "unparseable": 1,
        "failed": 0,
        "empty": 2,
        "accuracy": pytest.approx(4 / 8),
        "agreement": pytest.approx(expected),
    }
    report = scores(scored)["models"]["tuned"]
    assert report["judge_agreement"] == pytest.approx(expected)
    overall = report["benchmarks"]["synthetic"]["overall"]
    assert (overall["judge_n"], overall["judge_accuracy"]) == (8, pytest.approx(0.5))

    # A second run is answered from the cache: no new request reaches the server (nor
    # the check's probe: the cache answers everything).
    again = judge_rows(rows, cfg, tmp_path / "cache")
    assert server.total_requests == 8
    assert [r["judge_correct"] for r in again] == [r["judge_correct"] for r in judged]
    assert [r["judge_raw"] for r in again] == [r["judge_raw"] for r in judged]

    # The key is sent as the Bearer token and lands nowhere else.
    assert {e.authorization for e in server.events} == {f"Bearer {SENTINEL}"}
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    for text in (json.dumps(judged, default=str), caplog.text, cached):
        assert SENTINEL not in text


def test_the_same_answer_from_two_models_is_one_request(llm_server, tmp_path):
    judge = KeywordJudge()
    server = llm_server(responder=judge)
    item = PLANTED[0][0]
    rows = [item, {**item, "model": "base"}]
    judged = judge_rows(rows, make_cfg(server.url), tmp_path / "cache")
    assert [r["judge_correct"] for r in judged] == [True, True]
    assert judge.graded == 1


def test_failed_requests_give_none_with_the_error(llm_server, tmp_path):
    def fault(digest, attempt, body):
        return "500" if "blue" in body["messages"][-1]["content"] else None

    server = llm_server(responder=KeywordJudge(), fault_fn=fault, latency_s=0.05)
    rows = [r for r, _, _ in PLANTED[:6]]
    judged = judge_rows(rows, make_cfg(server.url), tmp_path / "cache", concurrency=2)
    by_id = {r["id"]: r for r in judged}
    for ident in ("b", "c", "f"):  # their prompts name blue: HTTP 500 on every attempt
        assert by_id[ident]["judge_correct"] is None and by_id[ident]["judge_raw"] is None
        assert by_id[ident]["judge_error"].startswith("http_500")
    assert by_id["a"]["judge_correct"] is True and by_id["a"]["judge_error"] is None
    assert judge_summary(judged)["failed"] == 3
    assert server.max_in_flight <= 2  # concurrency=2


def test_empty_predictions_need_no_endpoint_and_no_key(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV)
    rows = [row("h", "", ["dog"]), row("i", None, ["dog"]), row("j", " ... ", ["dog"])]
    judged = judge_rows(rows, make_cfg("http://127.0.0.1:9/v1"), tmp_path / "cache")
    assert [r["judge_correct"] for r in judged] == [False, False, False]
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------
# Failing fast, with what to do
# ---------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_fast(tmp_path, monkeypatch):
    backoffs = []  # every retry of a request waits its backoff first
    real = OpenAIBackend._backoff
    monkeypatch.setattr(
        OpenAIBackend, "_backoff", lambda self, e, n: backoffs.append(n) or real(self, e, n)
    )
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    cfg = make_cfg(url, max_attempts=6, backoff_initial_s=1.0, backoff_max_s=10.0)
    with pytest.raises(EndpointError, match="LLM judge") as info:
        judge_rows([r for r, _, _ in PLANTED], cfg, tmp_path / "cache")
    assert not backoffs  # not six attempts per row with backoff
    assert "base_url" in str(info.value) and url in str(info.value)
    assert SENTINEL not in str(info.value)


def test_a_model_the_server_does_not_serve_fails_fast(llm_server, tmp_path):
    server = llm_server(responder=KeywordJudge(), models=("test-model", "judge-large"))
    with pytest.raises(EndpointError, match="it serves: test-model, judge-large"):
        judge_rows([PLANTED[0][0]], make_cfg(server.url, model="no-such-judge"), tmp_path)
    assert server.total_requests == 0


def test_a_missing_key_says_which_variable_to_set(monkeypatch, llm_server, tmp_path):
    server = llm_server(responder=KeywordJudge())
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EndpointError, match=f"export {KEY_ENV}="):
        judge_rows([PLANTED[0][0]], make_cfg(server.url), tmp_path)
    assert server.total_requests == 0


def test_the_offline_writer_is_no_judge(tmp_path):
    with pytest.raises(ConfigError, match="backend: openai"):
        judge_rows([PLANTED[0][0]], {"backend": "offline"}, tmp_path)
