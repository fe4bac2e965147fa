"""The README's Python examples run as written (docs that match the code)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


@pytest.mark.parametrize("section", ["DC scores", "Per-sample Fisher"])
def test_readme_example_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_python_block(section), f"README:{section}", "exec"), namespace)
    if section == "DC scores":
        assert namespace["err"].shape == (4, 8, 8) and namespace["logits"].shape == (4, 8)
    else:
        assert set(namespace["acc"].fisher) and (tmp_path / "fisher.safetensors").is_file()
        assert namespace["penalty"].item() == 0.0  # theta equals its anchor
