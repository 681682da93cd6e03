"""Fast start: ``import cellular`` and the command line's argument handling never import the heavy dependencies."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "scvi", "scanpy", "pynndescent", "lightning", "anndata", "sklearn")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_cellular_imports_no_heavy_dependency():
    assert _imported_after("import cellular; cellular.__version__; dir(cellular)") == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["map", "--help"],
        ["map", "missing.h5ad", "missing_model", "-o", "out.h5ad"],
        ["train", "--epochs", "x"],
    ],
)
def test_command_line_handles_arguments_before_heavy_imports(argv, tmp_path):
    code = (
        "import os, cellular._cli as cli\n"
        f"os.chdir({str(tmp_path)!r})\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass"
    )
    assert _imported_after(code) == []


def test_names_load_on_first_use():
    import cellular

    assert cellular.CELLULAR.__name__ == "CELLULAR"
    assert cellular.ReferenceIndex is cellular.index.ReferenceIndex
    assert {"CELLULAR", "tl", "pp", "pl"} <= set(dir(cellular))
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        cellular.not_a_name  # noqa: B018
