"""perception.io: the project's one atomic writer (every artifact goes through it)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from perception.io import atomic_path, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_file_mode_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    # a fresh interpreter: the writer reads the umask once, at import
    code = (f"import os; os.umask({umask}); from perception.io import atomic_write_bytes; "
            f"atomic_write_bytes({str(tmp_path / 'a' / 'f.bin')!r}, b'x')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    assert stat.S_IMODE((tmp_path / "a" / "f.bin").stat().st_mode) == mode


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "r.json"
    atomic_write_json(dest, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert dest.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    atomic_write_text(dest, "new")
    assert dest.read_text() == "new"
