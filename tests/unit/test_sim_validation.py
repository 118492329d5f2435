"""vLLM's request validation errors, emulated: which prompts its union accepts, and how an
error list is worded (the real engine's answers are in tests/e2e/test_engine_contract.py)."""

from __future__ import annotations

from typing import Any

import pytest

from sim.validation import lax_int, prompt_errors, refuse, summarize


@pytest.mark.parametrize("prompt", ["", "x", [], [[]], [1, 2], [[1], [2, 3]], ["a", "b"], [1, "2"]])
def test_prompts_some_branch_of_the_union_accepts(prompt: Any) -> None:
    assert prompt_errors(prompt) == []


@pytest.mark.parametrize(
    ("prompt", "kinds"),
    [
        (5, ["list_type", "list_type", "string_type", "list_type"]),
        ([-1], ["greater_than_equal", "list_type", "string_type", "string_type"]),
        ([1.5], ["int_from_float", "list_type", "string_type", "string_type"]),
        ([None], ["int_type", "list_type", "string_type", "string_type"]),
    ],
)
def test_each_failing_branch_reports_its_errors_in_order(prompt: Any, kinds: list[str]) -> None:
    assert [e["type"] for e in prompt_errors(prompt)] == kinds


@pytest.mark.parametrize(
    ("value", "read"),
    [
        (2.0, 2),
        (" 7 ", 7),
        ("7.0", 7),
        ("+3", 3),
        (True, 1),
        ("7.5", "int_parsing"),
        ("1e3", "int_parsing"),
        (2.5, "int_from_float"),
        (float("nan"), "finite_number"),
        (1e30, "int_parsing_size"),
        (None, "int_type"),
        ([1], "int_type"),
    ],
)
def test_lax_ints_as_pydantic_reads_them(value: Any, read: int | str) -> None:
    """What ``pydantic.TypeAdapter(int).validate_python`` answers (pydantic 2.14)."""
    number, bad = lax_int(value, "body.x")
    assert (number if bad is None else bad["type"]) == read


def test_at_most_ten_errors_are_listed_and_inputs_are_summarized() -> None:
    errors = prompt_errors([-1] * 12)
    failure = refuse(errors)
    assert (failure.status, failure.error_type, failure.param) == (
        400,
        "Bad Request",
        "body.prompt.0",
    )
    assert failure.message.startswith(f"{len(errors)} validation errors:\n")
    assert failure.message.endswith(f"...and {len(errors) - 10} more errors")
    assert summarize({"a": 1}) == "<dict of 1 items>" and summarize("y" * 300).endswith(
        "[truncated]"
    )
