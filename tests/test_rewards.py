"""The built-in reward rules on hand-written answers."""

import pytest

from jaxlm.rewards import exact_answer, passage_answer, syllables, verse_line

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\nAy me.\n\nQuestion: Who speaks first?\nAnswer:"


def test_syllables():
    assert [syllables(w) for w in ("light", "window", "breaks", "yonder", "fire", "table", "the", "--")] == [
        1,
        2,
        1,
        2,
        1,
        2,
        1,
        0,
    ]


def test_verse_line_scores_ten_syllables_and_a_capital():
    line = "But soft, what light through yonder window breaks?"  # 10 syllables
    assert verse_line(None, [line, " " + line + "\nJULIET."]) == [1.0, 1.0]
    assert verse_line(None, [line.lower()]) == [0.5]
    assert verse_line(None, ["But soft."]) == [0.0]  # 2 syllables
    assert verse_line(None, ["But soft, what light through yonder window"]) == pytest.approx([0.8])  # 9
    assert verse_line(None, [""]) == [0.0]


def test_passage_answer_grades_grounding():
    refs, tasks = [" ROMEO"] * 4, ["first"] * 4
    answers = [" ROMEO", " JULIET\nmore", " ROMEO MONTAGUE", " HAMLET"]
    assert passage_answer([PROMPT] * 4, answers, completion=refs, task=tasks) == [3.0, 2.0, 0.5, 0.0]
    line = [" Ay me."]
    assert passage_answer([PROMPT], line, completion=line, task=["next_line"]) == [3.0]
    with pytest.raises(ValueError, match="completion"):
        passage_answer([PROMPT], [" ROMEO"])


def test_exact_answer():
    assert exact_answer([PROMPT] * 2, [" ROMEO\n", "Romeo"], completion=[" ROMEO"] * 2) == [1.0, 0.0]
