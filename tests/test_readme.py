"""The README's promises that code can check: its two commands, and every setting documented."""

import re
from pathlib import Path

from flows.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", README)


def test_the_readme_begins_with_two_commands_run_and_test():
    run, test = readme_commands()[:2]
    assert run.endswith("freshrec demo")
    assert test.endswith("python -m pytest")


def test_ci_runs_the_readmes_test_command():
    test = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    install, pytest_cmd = test.rsplit(" && ", 1)
    assert install in ci and pytest_cmd in ci


def test_every_setting_is_documented_in_the_readme():
    for env, _default, _doc in Config.documented():
        assert f"`{env}`" in README, env


def test_the_settings_table_rows_say_what_the_code_says():
    for env, default, doc in Config.documented():
        row = f"| `{env}` | {f'`{default}`' if default else '(empty)'} | {doc} |"
        assert row in README, f"README's row of {env} should read: {row}"
