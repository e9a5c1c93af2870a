import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_the_train_and_test_commands():
    train, test = readme_commands()[:2]
    assert "pip install torch==2.13.0" in train and "reach-v3" in train
    assert "pip install torch==2.13.0" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
    assert "rm -rf .venv" in ci_lines  # a fresh virtualenv every run
