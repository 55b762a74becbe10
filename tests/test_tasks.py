import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tasks


# ----------------------------------------------------------------------------- data
def test_read_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "answer": 3}\n\n{"prompt": "b", "answer": "4", "extra": 1}\n')
    assert tasks.read_jsonl(str(path), ("prompt", "answer")) == [
        {"prompt": "a", "answer": "3"},
        {"prompt": "b", "answer": "4", "extra": 1},
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "b"}', "missing field 'answer'"),
        ('{"prompt": "b", "answer": null}', "field 'answer' must be a string"),
        ('{"prompt": "b", "answer": ', "not valid JSON"),
        ('["b", "4"]', "expected a JSON object"),
        ('{"prompt": "b", "answer": NaN}', "field 'answer' must be a string or a finite number, got nan"),
    ],
)
def test_read_jsonl_bad_line_names_file_line_and_field(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=f"data.jsonl:2: {message}"):
        tasks.read_jsonl(str(path), ("prompt", "answer"))


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        tasks.read_jsonl(str(tmp_path / "nope.jsonl"), ("prompt",))


# ----------------------------------------------------------------------------- arithmetic task
def test_arithmetic_problems_split_is_disjoint_and_fixed():
    train = tasks.arithmetic_problems(2000, digits=2, split="train", seed=0)
    test = tasks.arithmetic_eval_set(300, digits=2)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert test == tasks.arithmetic_eval_set(300, digits=2)
    for problem in train[:50] + test[:50]:
        a, b = (int(x) for x in problem["prompt"].removesuffix("=").split("+"))
        assert 0 <= a < 100 and 0 <= b < 100 and problem["answer"] == str(a + b)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6), noise=st.text(max_size=30))
def test_exact_match_reward(a, b, noise):
    answer = str(a + b)
    assert tasks.exact_match(answer, answer) == 1.0
    assert tasks.exact_match(f" {answer}\n", answer) == 1.0
    assert tasks.exact_match(str(a + b + 1), answer) == 0.0
    assert tasks.exact_match(answer + "0", answer) == 0.0
    assert tasks.exact_match(noise, answer) in (0.0, 1.0)  # any text: a score, never an exception
    if noise.strip() != answer:
        assert tasks.exact_match(noise, answer) == 0.0


@pytest.mark.parametrize(
    "completion", ["", " ", "abc", "__import__('os')", "8" * 10_000, "82 82", "8 2", "+82", "82.0"]
)
def test_exact_match_rejects_garbage(completion):
    assert tasks.exact_match(completion, "82") == 0.0


def test_arithmetic_reward_takes_dataset_fields():
    rewards = tasks.arithmetic_reward(["1+1=", "2+2="], ["2", "5"], answer=["2", "4"], other_field=[0, 0])
    assert rewards == [1.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 999), b=st.integers(0, 999), seed=st.integers(0, 100))
def test_near_miss_is_plausible_and_wrong(a, b, seed):
    wrong = int(tasks.near_miss(a, b, random.Random(seed)))
    assert wrong != a + b and wrong >= 0
    assert abs(len(str(wrong)) - len(str(a + b))) <= 1


def test_preference_pairs():
    pairs = tasks.arithmetic_preference_pairs(100, digits=2, seed=0)
    assert len(pairs) == 100
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"] and int(pair["rejected"]) >= 0
        a, b = (int(x) for x in pair["prompt"][:-1].split("+"))
        assert pair["chosen"] == str(a + b)


# ----------------------------------------------------------------------------- rewards
@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7", 1.0),
        ("#### 1,234\nthanks, 99", "1234", 1.0),
        ("Answer: $12.", "12", 1.0),
        ("Answer: 12.0 apples", "12", 0.0),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("Answer: \\boxed{42}", "42", 1.0),
        ("it is 5, no wait, 6", "6", 1.0),
        ("it is 6, no wait, 5", "6", 0.0),
        ("so x = -5", "-5", 1.0),
        ("we get 12-5", "-5", 0.0),
        ("the values 3,4", "34", 0.0),
        ("it is .5", "5", 0.0),
        ("1,234.5 in all", "1234.5", 1.0),
        ("the answer is 0.5", "1/2", 0.0),
        ("__import__('os')", "0", 0.0),
        ("", "3", 0.0),
    ],
)
def test_math_answer_reward(completion, answer, expected):
    assert tasks.math_answer_reward(["q"], [completion], answer=[answer]) == [expected]


def test_format_reward():
    assert tasks.format_reward(["q"] * 4, ["x\n#### 3", "Answer: 4", "\\boxed{5}", "just 6"]) == [1.0, 1.0, 1.0, 0.0]


def test_arithmetic_demonstrations_are_distinct_training_problems():
    rows = tasks.arithmetic_demonstrations(500, digits=2, seed=3)
    assert len({row["prompt"] for row in rows}) == 500 and rows == tasks.arithmetic_demonstrations(500, 2, seed=3)
    held_out = {row["prompt"] for row in tasks.arithmetic_eval_set(500)}
    for row in rows:
        a, b = (int(x) for x in row["prompt"].removesuffix("=").split("+"))
        assert not tasks.is_held_out(a, b) and row["prompt"] not in held_out
        assert row["answer"] == row["completion"] == str(a + b)
    with pytest.raises(ValueError, match="--num-demonstrations must be between 1 and"):
        tasks.arithmetic_demonstrations(10**6, digits=2)


@pytest.mark.parametrize("digits", [0, -1])
def test_digits_below_one_is_an_error_not_a_hang(digits):
    with pytest.raises(ValueError, match="--digits must be at least 1"):
        tasks.arithmetic_problems(3, digits=digits)


def test_read_jsonl_names_the_line_of_a_byte_that_is_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        tasks.read_jsonl(str(path), ("prompt", "answer"))


def test_row_fields_passes_a_field_missing_from_some_rows_as_none():
    rows = [{"prompt": "a", "answer": "1", "hint": "h"}, {"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": "3"}]
    assert tasks.row_fields(rows) == {"answer": ["1", "2", "3"], "hint": ["h", None, None]}
    assert tasks.math_answer_reward(["a", "b"], ["1", "5"], **tasks.row_fields(rows[:2])) == [1.0, 0.0]


def test_load_rows_holds_out_the_first_rows_of_a_file_and_the_test_split_of_arithmetic(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(50)))
    train, held_out = tasks.load_rows(str(path), "prompts", held_out=500)
    assert [row["prompt"] for row in held_out] == ["0+1=", "1+1=", "2+1=", "3+1=", "4+1="] and len(train) == 45
    train, held_out = tasks.load_rows("arithmetic", "sft", num_rows=20, seed=1, held_out=7)
    assert len(train) == 20
    assert held_out == [row | {"completion": row["answer"]} for row in tasks.arithmetic_eval_set(7)]
    assert all(row["completion"] == row["answer"] for row in train)
    pairs, held_out_pairs = tasks.load_rows("arithmetic", "pairs", num_rows=5, held_out=3)
    assert pairs == tasks.arithmetic_preference_pairs(5) and len(held_out_pairs) == 3
    with pytest.raises(ValueError, match="missing field 'chosen'"):
        tasks.load_rows(str(path), "pairs")


def test_eval_problems_come_from_the_eval_file_or_the_arithmetic_test_split(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "What is 2 + 2?", "answer": 4}\n{"prompt": "What is 3 + 3?", "answer": 6}\n')
    assert tasks.eval_problems("train.jsonl", str(path), size=1) == [{"prompt": "What is 2 + 2?", "answer": "4"}]
    assert tasks.eval_problems("arithmetic", None, digits=2, size=4) == tasks.arithmetic_eval_set(4)
    assert tasks.eval_problems("train.jsonl", None) == []
    assert tasks.eval_reward("arithmetic") is tasks.arithmetic_reward
    assert tasks.eval_reward("train.jsonl") is tasks.math_answer_reward
