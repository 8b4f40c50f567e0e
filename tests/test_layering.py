"""The package's two layers stay apart: the torch-only building blocks import without Lightning,
and the old import paths of moved modules still resolve (with a DeprecationWarning)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import warnings

import pytest

# Every module below these must import with `lightning` (and `lightning_utilities`) unavailable.
TORCH_ONLY = [
    "lightning_utils.io",
    "lightning_utils.data",
    "lightning_utils.optim",
    "lightning_utils.modules",
    "lightning_utils.control",
    "lightning_utils.patterns",
    "lightning_utils.distributed",
    "lightning_utils._internals",
]

_BLOCK_AND_IMPORT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"lightning", "lightning_utilities", "pytorch_lightning"}:
                raise ImportError(f"blocked by the layering test: {name}")
            return None

    if sys.argv[1] == "block":
        sys.meta_path.insert(0, Block())
    imported = []
    for root in sys.argv[2:]:
        module = importlib.import_module(root)
        imported.append(root)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=root + "."):
            importlib.import_module(info.name)
            imported.append(info.name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"lightning", "lightning_utilities"})
    assert not leaked, leaked
    print("\\n".join(imported))
    """
)


@pytest.mark.parametrize("lightning", ["block", "installed"])
def test_torch_only_layer_never_imports_lightning(lightning: str) -> None:
    """With Lightning unavailable the layer imports; with it installed the layer leaves it alone."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_AND_IMPORT, lightning, *TORCH_ONLY],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        "a torch-only module imports lightning (move that code to callbacks/ or plugins/, or reach "
        f"Lightning through lightning_utils._internals lazily):\n{result.stderr}"
    )
    imported = set(result.stdout.split())
    assert {"lightning_utils.io.state", "lightning_utils.data.loader", "lightning_utils.modules.offload"} <= imported


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("lightning_utils.samplers", "lightning_utils.data.samplers", "RandomSampler"),
        ("lightning_utils.dataloader", "lightning_utils.data.loader", "ResumableDataLoader"),
        ("lightning_utils.offload", "lightning_utils.modules.offload", "apply_activation_offload"),
        ("lightning_utils.replacements", "lightning_utils.modules.presets", "sdpa_attention"),
        ("lightning_utils.module_targets", "lightning_utils.modules.targets", "find_targets"),
        ("lightning_utils.module_swap", "lightning_utils.modules.swap", "replace_modules"),
        ("lightning_utils.commands", "lightning_utils.control.commands", "parse_command"),
        ("lightning_utils.command_sources", "lightning_utils.control.sources", "FileSource"),
        ("lightning_utils.model_surgery", "lightning_utils.callbacks.module_transform", "ModuleTransform"),
        ("lightning_utils.io.checkpoint_io", "lightning_utils.plugins.checkpoint_io", "SafetensorsCheckpointIO"),
        ("lightning_utils.io.module_loading", "lightning_utils.plugins.module_loading", "load_from_checkpoint"),
    ],
)
def test_old_module_paths_resolve_to_the_same_objects_with_a_deprecation_warning(old: str, new: str, name: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("name", ["SafetensorsCheckpointIO", "AsyncCheckpointIO", "load_from_checkpoint"])
def test_old_class_paths_on_the_io_package_still_resolve(name: str) -> None:
    import lightning_utils.io as io
    import lightning_utils.plugins as plugins

    with pytest.warns(DeprecationWarning, match=f"lightning_utils.io.{name} moved to lightning_utils.plugins.{name}"):
        assert getattr(io, name) is getattr(plugins, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            getattr(io, "nope")  # noqa: B009 - the attribute access itself is under test
