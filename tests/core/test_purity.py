"""The core must stay pure, and `import fdship` must stay light."""

import subprocess
import sys

FORBIDDEN_IN_CORE = ["tornado", "asyncio", "socket", "textual", "psutil", "time"]


def _loaded_after(stmt: str) -> set[str]:
    code = f"import sys; before = set(sys.modules); {stmt}; print('\\n'.join(sorted(set(sys.modules) - before)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_core_imports_no_io_or_clock_modules():
    loaded = _loaded_after("import fdship.core.scheduler, fdship.core.views, fdship.core.placement, fdship.core.records")
    bad = {m for m in loaded for f in FORBIDDEN_IN_CORE if m == f or m.startswith(f + ".")}
    assert not bad, f"fdship.core pulled in {sorted(bad)}"


def test_import_fdship_loads_no_tornado_or_textual():
    loaded = _loaded_after("import fdship")
    assert not {m for m in loaded if m.split(".")[0] in ("tornado", "textual")}


def test_core_source_has_no_forbidden_imports():
    import pathlib

    import fdship.core

    for path in pathlib.Path(fdship.core.__file__).parent.glob("*.py"):
        text = path.read_text()
        for mod in ("tornado", "asyncio", "socket", "time"):
            assert f"import {mod}\n" not in text and f"from {mod} " not in text, (path, mod)
