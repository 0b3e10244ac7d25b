"""The final number of a math word problem's worked solution, and whether a generation got it right.

The rule is peft's MetaMathQA → GSM8K method comparison's (`method_comparison/MetaMathQA/utils.py`, read at peft
commit 5d602fdb), so accuracies compare with its results:

1. The text, stripped, without trailing `.`, `!`, `?`.
2. The first of the delimiters `The answer is: `, `The answer is `, `The final answer is: `, `The final answer is `,
   `#### ` (in that order) that occurs anywhere in it; none: no answer.
3. What follows the last occurrence of that delimiter, up to the end of its line, stripped of ` .!?$%` at both ends.
4. A number by Python's `Decimal` (negatives, decimals, exponents) or `a/b`; anything else (`1,234`, `12 apples`,
   two numbers) is not a number: a wrong answer, as in peft's benchmark.

Correct means a number equal to the gold number as floats (`18` = `18.0`). A generation with no number counts as
wrong and as "no answer" (`no_answer_fraction`).
"""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

RULE = "peft-metamathqa"  # the rule's name, recorded with every evaluation
DELIMITERS = ("The answer is: ", "The answer is ", "The final answer is: ", "The final answer is ", "#### ")


def extract(text: str) -> str | None:
    """The answer text a worked solution or a generation ends with (steps 1-3); None when it names none."""
    text = text.strip().rstrip(".!?")
    delimiter = next((d for d in DELIMITERS if d in text), None)
    if delimiter is None:
        return None
    answer = text.rpartition(delimiter)[2].strip().split("\n")[0]
    return answer.strip(" .!?$%")


def to_number(answer: str | None) -> Decimal | None:
    """The answer as a number (step 4); None when it is not one."""
    if not answer:
        return None
    try:
        if "/" in answer:
            numerator, denominator = answer.split("/")  # more than one '/': ValueError
            value = Decimal(numerator) / Decimal(denominator)
        else:
            value = Decimal(answer)
    except (ValueError, InvalidOperation, ZeroDivisionError, ArithmeticError):
        return None
    return value if value.is_finite() else None


def final_number(text: str) -> Decimal | None:
    """The number a worked solution or a generation ends with; None when there is none."""
    return to_number(extract(text))


def is_correct(generation: str, gold: Decimal) -> bool:
    """The generation's final number equals the gold number (as floats)."""
    value = final_number(generation)
    return value is not None and float(value) == float(gold)
