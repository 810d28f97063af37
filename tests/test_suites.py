"""benchmarks.toml: the standard suites load; errors name file, line, suite and key."""

import pytest

from lengen.errors import ConfigError
from lengen.suites import apply_overrides, load_suites_file, parse_suites

GOOD = """
[s]
window = 32
[s.train]
steps = 10
"""


def test_standard_suites_validate(repo_root):
    suites = load_suites_file(repo_root / "benchmarks.toml")
    assert "tiny" in suites
    tiny = suites["tiny"]
    assert tiny.window == 64 and tiny.eval_tokens == 20 * 64
    assert tiny.eval.positions == [1, 2, 5, 10, 20]


def test_malformed_toml_names_file_and_line(tmp_path):
    p = tmp_path / "bench.toml"
    p.write_text("[s]\nwindow = 32\n[s.train\nsteps = 3\n")
    with pytest.raises(ConfigError) as exc:
        load_suites_file(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:3:") and "malformed TOML" in msg


def test_unknown_key_names_file_line_suite_key(tmp_path):
    p = tmp_path / "bench.toml"
    p.write_text(GOOD + "lrr = 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_suites_file(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:6:")
    assert "suite 's'" in msg and "unknown key 'lrr' in [s.train]" in msg and "did you mean 'lr'?" in msg


@pytest.mark.parametrize("window", [0, -64])
def test_window_must_be_positive(window):
    with pytest.raises(ConfigError, match=r"benchmarks.toml:3: suite 's': \[s\] window: window must be a positive"):
        parse_suites(GOOD.replace("window = 32", f"window = {window}"))


def test_eval_length_shorter_than_window_is_refused():
    with pytest.raises(ConfigError, match="shorter than the training window"):
        parse_suites(GOOD + "[s.eval]\nlength = 0.5\npositions = [0.5]\n")


def test_positions_beyond_length_refused():
    with pytest.raises(ConfigError, match=r"eval.positions \[20\] lie beyond eval.length = 10"):
        parse_suites(GOOD + "[s.eval]\nlength = 10\npositions = [1, 20]\n")


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"\[s.train\] is missing the required key 'steps'"):
        parse_suites("[s]\nwindow = 8\n[s.train]\nlr = 0.1\n")


def test_wrong_type_reports_value():
    with pytest.raises(ConfigError, match=r"steps: .*\(got 'many'\)"):
        parse_suites("[s]\nwindow = 8\n[s.train]\nsteps = 'many'\n")


def test_overrides_parse_toml_values():
    table = {"window": 8, "train": {"steps": 1}}
    out = apply_overrides(table, ["train.lr=1e-3", "train.betas=[0.8, 0.9]", "data.name=abc", "window=16"])
    assert out["train"]["lr"] == 1e-3 and out["train"]["betas"] == [0.8, 0.9]
    assert out["data"]["name"] == "abc" and out["window"] == 16
    assert table["window"] == 8  # input untouched
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(table, ["nonsense"])
