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


def test_readme_export_loading_code_is_what_export_writes():
    """The README's diffusers loading code for an export is the code `dcfast export` puts in its model card."""
    from dcfast.export import loading_code

    block = _python_block("Export for diffusers")
    written = loading_code({"name_or_path": "path/to/base"}, "my-concepts", ["<v1>", "<v2>"])
    readme_lines = [line.split("   #")[0].rstrip() for line in block.strip().splitlines()]
    code_lines = [line.replace("'", '"') for line in written.strip().splitlines()]
    assert readme_lines == code_lines
