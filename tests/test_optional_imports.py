"""Nothing optional is imported until it is used: every module of the package imports with the
optional extras unavailable (orjson, transformers, torchao, bitsandbytes, jsonargparse,
matplotlib, the fsspec back ends), and a JSON call is what brings orjson in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_IMPORT_ALL_WITH_EXTRAS_BLOCKED = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys, warnings
    warnings.simplefilter("ignore")
    OPTIONAL = {"orjson", "transformers", "torchao", "bitsandbytes", "jsonargparse", "matplotlib",
                "s3fs", "gcsfs", "adlfs", "moto"}
    import torch, lightning.pytorch  # Lightning itself imports some of them when installed
    for name in [m for m in sys.modules if m.split(".")[0] in OPTIONAL]:
        del sys.modules[name]  # so that an import of ours would have to find them again

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in OPTIONAL:
                raise ModuleNotFoundError(f"blocked by the test: {name}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import lightning_utils
    failed = []
    for info in pkgutil.walk_packages(lightning_utils.__path__, "lightning_utils."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed.append(f"{info.name}: {exc!r}")
    print("\\n".join(failed) or "ok")
    """
)


def test_every_module_imports_with_the_optional_extras_unavailable() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL_WITH_EXTRAS_BLOCKED],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok", done.stdout


def test_orjson_is_imported_by_the_first_json_call_not_before() -> None:
    code = (
        "import sys\n"
        "import lightning_utils.io as io\n"
        "print('orjson' in sys.modules)\n"
        "io.json_dumps({'a': 1})\n"
        "print('orjson' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stdout.split()
    assert before == "False"
    import importlib.util

    assert after == str(importlib.util.find_spec("orjson") is not None)
