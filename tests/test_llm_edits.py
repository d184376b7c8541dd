"""Reading answers: whole files and diffs for the code agent, JSON configs for the HP agent and Centaur."""
from __future__ import annotations

import pytest

from hybrid.llm.edits import apply_diff, fenced_blocks, read_edit
from hybrid.llm.guard import PatchRejected
from hybrid.llm.hp_agent import ConfigRejected, read_config
from hybrid.paths import PROJECT_ROOT
from hybrid.space import load_space

CURRENT = "".join(f"line {i}\n" for i in range(1, 41))
SPACE = load_space(PROJECT_ROOT / "search_space.yaml", "test")


def fence(lang: str, body: str) -> str:
    return f"```{lang}\n{body.rstrip()}\n```"


def rejected(answer: str, current: str = CURRENT) -> str:
    with pytest.raises(PatchRejected) as e:
        read_edit(answer, current)
    return e.value.reason


# -- whole files ----------------------------------------------------------------------------------------------

def test_a_whole_file_with_prose_around_it():
    new = CURRENT.replace("line 7\n", "line seven\n")
    answer = f"**Change:** rename line 7\n\nI think this reads better.\n\n{fence('python', new)}\n\nHope this helps!"
    edit = read_edit(answer, CURRENT)
    assert (edit.code, edit.description, edit.form) == (new, "rename line 7", "file")


def test_the_description_falls_back_to_the_first_line_of_prose():
    new = CURRENT.replace("line 7\n", "line seven\n")
    edit = read_edit(f"## Use a clearer `line_7` name\n\n{fence('py', new)}", CURRENT)
    assert edit.description == "Use a clearer line_7 name"


def test_the_largest_python_block_is_the_file():
    new = CURRENT.replace("line 3\n", "line three\n")
    answer = f"Before:\n{fence('python', 'line 3')}\nAfter, the whole file:\n{fence('python', new)}"
    assert read_edit(answer, CURRENT).code == new


def test_a_fragment_is_refused():
    assert "answer the whole file" in rejected(fence("python", "line 3\nline three\n"))


@pytest.mark.parametrize("placeholder", ["    ...", "# ... rest of the file unchanged ...", "# the training loop stays unchanged",
                                         "# (existing code)", "…"])
def test_a_placeholder_is_refused(placeholder):
    body = CURRENT.replace("line 20\n", placeholder + "\n")
    assert "placeholder" in rejected(fence("python", body))


def test_a_cut_off_block_is_refused():
    assert "cut off" in rejected("Here is the file:\n```python\n" + CURRENT[:100])


@pytest.mark.parametrize("answer", [
    "Here is the updated harness/evaluate.py:\n" + fence("python", CURRENT),
    fence("python title=harness/runner.py", CURRENT),
    fence("python", "# harness/api.py\n" + CURRENT),
])
def test_a_file_other_than_train_py_is_refused(answer):
    assert "only train.py may change" in rejected(answer)


def test_a_file_named_train_py_is_accepted():
    new = CURRENT.replace("line 1\n", "line one\n")
    assert read_edit("The complete `train.py`:\n" + fence("python", new), CURRENT).code == new


def test_no_code_is_refused():
    assert "no python block and no unified diff" in rejected("I would try SwiGLU next.")


# -- diffs --------------------------------------------------------------------------------------------------

DIFF = """--- a/train.py
+++ b/train.py
@@ -4,3 +4,3 @@
 line 4
-line 5
+line five
 line 6
@@ -30,2 +30,3 @@ def somewhere():
 line 30
+line 30.5
 line 31
"""


def test_a_diff_in_a_fence():
    edit = read_edit("Change: two small edits\n\n" + fence("diff", DIFF), CURRENT)
    assert edit.form == "diff" and edit.description == "two small edits"
    assert edit.code == CURRENT.replace("line 5\n", "line five\n").replace("line 31\n", "line 30.5\nline 31\n")


def test_wrong_line_numbers_and_counts_are_forgiven():
    sloppy = DIFF.replace("@@ -4,3 +4,3 @@", "@@ -9,7 +9,2 @@").replace("@@ -30,2 +30,3 @@ def somewhere():", "@@")
    assert read_edit(fence("diff", sloppy), CURRENT).code == read_edit(fence("diff", DIFF), CURRENT).code


def test_a_bare_diff_and_an_unlabelled_fence():
    expected = read_edit(fence("diff", DIFF), CURRENT).code
    assert read_edit(DIFF, CURRENT).code == expected
    assert read_edit(fence("", DIFF), CURRENT).code == expected


def test_trailing_spaces_and_blank_context_lines():
    current = "a\n\nb  \nc\n"
    diff = "@@ -1,4 +1,4 @@\n a\n\n-b\n+B\n c\n"
    assert apply_diff(diff, current) == "a\n\nB\nc\n"


def test_nothing_is_applied_half_way():
    broken = DIFF.replace(" line 30\n", " line 300\n")
    assert "hunk 2" in rejected(fence("diff", broken))


def test_a_diff_of_another_file_or_a_new_file_is_refused():
    other = DIFF.replace("a/train.py", "a/harness/api.py").replace("b/train.py", "b/harness/api.py")
    assert "the diff edits harness/api.py" in rejected(fence("diff", other))
    new_file = "--- /dev/null\n+++ b/helpers.py\n@@ -0,0 +1 @@\n+x = 1\n"
    assert "creates or deletes a file" in rejected(fence("diff", new_file))


def test_a_cut_off_diff_is_refused():
    assert "cut off inside the diff" in rejected("```diff\n" + DIFF)


def test_a_garbled_diff_line_is_refused():
    assert "neither context" in rejected(fence("diff", DIFF.replace(" line 6\n", "*line 6\n")))


def test_fenced_blocks():
    blocks = fenced_blocks("a\n```json\n{}\n```\nb\n~~~\nx\n~~~\n```python\nopen")
    assert [(b.language, b.text, b.closed) for b in blocks] == [("json", "{}\n", True), ("", "x\n", True),
                                                                 ("python", "open\n", False)]


# -- configs ------------------------------------------------------------------------------------------------

def config_rejected(answer: str) -> str:
    with pytest.raises(ConfigRejected) as e:
        read_config(answer, SPACE)
    return e.value.reason


def test_a_config_with_model_slips():
    answer = 'Let me think.\n```json\n{\n  "DEPTH": 3,  // deeper\n  "MATRIX_LR": "0.05",\n  "URL": "http://x",\n}\n```'
    config, note = read_config(answer, SPACE)
    assert config["DEPTH"] == 3 and config["MATRIX_LR"] == 0.05 and config["WINDOW_PATTERN"] == "SSSL"
    assert "ignored unknown URL" in note and "defaults for ASPECT_RATIO" in note


def test_a_wrapped_or_bare_config():
    assert read_config('{"config": {"DEPTH": 4}}', SPACE)[0]["DEPTH"] == 4
    assert read_config('I propose {"DEPTH": 1, "HEAD_DIM": 64} as the next trial.', SPACE)[0]["HEAD_DIM"] == 64


def test_the_last_json_block_wins():
    answer = 'Before: ```json\n{"DEPTH": 1}\n```\n\nFinal:\n```json\n{"DEPTH": 3}\n```'
    assert read_config(answer, SPACE)[0]["DEPTH"] == 3


def test_clamping_is_noted():
    config, note = read_config('```json\n{"DEPTH": 40, "WEIGHT_DECAY": -1, "HEAD_DIM": 20.4}\n```', SPACE)
    assert (config["DEPTH"], config["WEIGHT_DECAY"], config["HEAD_DIM"]) == (4, 0.0, 20)
    assert "clamped DEPTH 40 -> 4, WEIGHT_DECAY -1 -> 0, HEAD_DIM 20.4 -> 20" in note


@pytest.mark.parametrize("answer, why", [
    ('```json\n{"DEPTH": 3,, }\n```', "not valid JSON"),
    ('```json\n{"DEPTH": 3', "cut off"),
    ("no config here", "no JSON object"),
    ('```json\n{"DEPTH": [3]}\n```', "DEPTH is int"),
    ('```json\n{"DEPTH": null}\n```', "DEPTH is int"),
    ('```json\n{"WINDOW_PATTERN": 3}\n```', "is not one of"),
    ('```json\n"DEPTH=3"\n```', "not an object"),
])
def test_unreadable_configs(answer, why):
    assert why in config_rejected(answer)
