"""`gcache selftest`: the gold answers through the real extraction and sandbox, as a user runs it."""

from typer.testing import CliRunner

from gcache_cli.main import app

runner = CliRunner()


def test_selftest_math_and_choice_pass():
    for task in ("gsm8k", "medqa", "gpqa"):
        result = runner.invoke(app, ["selftest", task, "--limit", "10"])
        assert result.exit_code == 0, result.output
        assert "100.0%" in result.output


def test_selftest_code_runs_the_sandbox():
    result = runner.invoke(app, ["selftest", "humaneval", "--limit", "4", "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "humaneval" in result.output and "100.0%" in result.output


def test_selftest_fails_below_100_percent(monkeypatch):
    import gcache.io.tasks.scoring as tasks

    real = tasks.gold_replies
    monkeypatch.setattr(tasks, "gold_replies", lambda item: real(item) + ["I have no idea."])
    result = runner.invoke(app, ["selftest", "gsm8k", "--limit", "3"])
    assert result.exit_code == 1
    assert "83.3%" in result.output and "FAIL" in result.output


def test_selftest_unknown_task_is_one_clear_error():
    result = runner.invoke(app, ["selftest", "mmlu"])
    assert result.exit_code == 2
    assert "unknown task 'mmlu'" in result.output
