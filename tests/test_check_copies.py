"""scripts/check_copies.py: a drifted copy fails the check, --fix restores it, the real tree passes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_copies.py"

ORIGINAL = '''\
class AlphaHead:
    def scale(self, value: float) -> float:
        return value * 2


def alpha_loss(alpha_config, value):
    """Alpha's loss."""
    return value * alpha_config.weight
'''

COPY = '''\
# Copied from hub.models.alpha.modeling_alpha.alpha_loss with alpha->beta, Alpha->Beta
def beta_loss(beta_config, value):
    """Beta's loss."""
    return value * beta_config.weight


class BetaHead:
    # Copied from hub.models.alpha.modeling_alpha.AlphaHead.scale
    def scale(self, value: float) -> float:
        return value * 2
'''


def _tree(tmp_path: Path) -> Path:
    for family, text in (("alpha", ORIGINAL), ("beta", COPY)):
        package = tmp_path / "hub" / "models" / family
        package.mkdir(parents=True)
        (package / f"modeling_{family}.py").write_text(text)
    return tmp_path


def _tree_with_edited_copy(tmp_path: Path, old: str, new: str) -> tuple[Path, Path]:
    """The tree, with `old` replaced by `new` in the copying file; returns the root and that file."""
    root = _tree(tmp_path)
    copy_file = root / "hub" / "models" / "beta" / "modeling_beta.py"
    text = copy_file.read_text()
    assert old in text
    copy_file.write_text(text.replace(old, new))
    return root, copy_file


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True, check=False
    )


def test_copies_in_sync_pass(tmp_path):
    assert _run(_tree(tmp_path)).returncode == 0


def test_drifted_copy_fails_and_fix_restores_it(tmp_path):
    root, copy_file = _tree_with_edited_copy(tmp_path, "return value * 2", "return value * 3")
    failed = _run(root)
    assert failed.returncode == 1
    assert "modeling_beta.py:9: differs from hub.models.alpha.modeling_alpha.AlphaHead.scale" in failed.stderr
    assert "-        return value * 2" in failed.stderr and "+        return value * 3" in failed.stderr
    fixed = _run(root, "--fix")
    assert fixed.returncode == 0, fixed.stderr
    assert copy_file.read_text() == COPY
    assert _run(root).returncode == 0


def test_replacements_apply_to_the_original(tmp_path):
    root, copy_file = _tree_with_edited_copy(tmp_path, '"""Beta\'s loss."""', '"""Alpha\'s loss."""')
    failed = _run(root)
    assert failed.returncode == 1 and "modeling_beta.py:2: differs" in failed.stderr
    _run(root, "--fix")
    assert copy_file.read_text() == COPY


def test_marker_naming_nothing_is_an_error(tmp_path):
    root, _ = _tree_with_edited_copy(tmp_path, "alpha_loss with", "gamma_loss with")
    result = _run(root)
    assert result.returncode == 2 and "defines no gamma_loss" in result.stderr


def test_real_tree_copies_are_in_sync():
    result = _run(ROOT)
    assert result.returncode == 0, result.stderr
