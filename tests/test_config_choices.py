"""config.py is a leaf: it writes the choices of its string fields itself. Each tuple must equal the
one the implementing module checks against, so a choice added in one place and not the other fails."""
import ast
import sys
import subprocess
from pathlib import Path

import pytest

from cosmos_fast import config
from cosmos_fast import ops
from cosmos_fast.ops import contrastive
from cosmos_fast.data import captions, stream

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,module", [
    ("CONTRASTIVE_IMPLS", ops), ("CROSS_POOL_IMPLS", ops), ("GRAD_SEMANTICS", contrastive),
    ("LOSS_OPERANDS", contrastive),        # data.augment: transforms reads config's
    ("MODES", captions), ("STRING_FIELD_POLICIES", captions), ("WORKER_START_METHODS", stream)])
def test_config_choices_equal_the_implementing_modules(name, module):
    assert getattr(config, name) == getattr(module, name)


def test_config_imports_nothing_from_the_package():
    tree = ast.parse((REPO / "cosmos_fast" / "config.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports
    for node in imports:
        assert not (isinstance(node, ast.ImportFrom) and node.level), ast.unparse(node)
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert not any(n.split(".")[0] in ("cosmos_fast", "torch") for n in names), ast.unparse(node)


def test_config_and_validate_do_not_import_torch():
    code = ("import sys; from cosmos_fast.config import load_config, validate; "
            "validate(load_config('tiny-cpu', ['data.train_shards=x-{0..3}.tar'])); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
