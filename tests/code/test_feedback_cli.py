"""``emassist correct`` and ``emassist feedback list|resolve|commit``: the image found by file, sha256 prefix or logged
path; errors that say what to do, with exit codes; ``feedback commit`` against a real DVC repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emassist.cli.main import main
from emassist.data.feedback import sha256_of
from emassist.data.predlog import PredictionLog, PredictionRow
from tests.helpers import GIT_IDENTITY, encode, texture

CLASSES = ["Fibres", "Nanowires", "Particles"]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.delenv("EMASSIST_MONITORING_DB_URI", raising=False)
    db, fb = tmp_path / "log.db", tmp_path / "feedback"
    params = tmp_path / "params.yaml"
    monitoring = {"db_uri": f"sqlite:///{db}", "feedback_dir": str(fb)}
    params.write_text(yaml.safe_dump({"data": {"classes": CLASSES}, "monitoring": monitoring}))
    return {"params": params, "db": db, "fb": fb, "root": tmp_path}


def _run(env: dict[str, Path], *argv: str) -> int:
    return main(["--params", str(env["params"]), *argv])


def _store(env: dict[str, Path]) -> PredictionLog:
    return PredictionLog(f"sqlite:///{env['db']}")


def _image(env: dict[str, Path], name: str, seed: int) -> Path:
    path = env["root"] / name
    path.write_bytes(encode(texture(40, 40, seed=seed), "TIFF" if name.endswith(".tif") else "PNG"))
    return path


def _log(env: dict[str, Path], path: Path, label: str = "Fibres", origin: str | None = None) -> str:
    """A prediction of ``path`` as `emassist predict` logs it (origin: the path), or the page (origin: a name)."""
    sha = sha256_of(path.read_bytes())
    source = "cli" if origin is None else "web"
    row = PredictionRow(source=source, sha256=sha, label=label, confidence=0.6, probabilities={label: 0.6},
                        needs_review=True, origin=origin or str(path), model_version="4")  # fmt: skip
    _store(env).write([row])
    return sha


def test_correct_a_file_stores_it_with_the_logged_model_and_label(env: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    img = _image(env, "a.tif", 1)
    sha = _log(env, img, "Fibres")
    assert _run(env, "correct", str(img), "--label", "Nanowires", "--who", "Ada") == 0
    assert f"{sha[:12]} corrected to Nanowires" in capsys.readouterr().out
    assert (env["fb"] / "Nanowires" / f"{sha}.tif").read_bytes() == img.read_bytes()
    row = _store(env).corrections().iloc[0]
    assert (row.old_label, row.new_label, row.model_version, row.who) == ("Fibres", "Nanowires", "4", "Ada")
    assert _run(env, "correct", sha[:10], "--label", "Nanowires") == 0  # by prefix: a repeat
    assert "already corrected to Nanowires: nothing new" in capsys.readouterr().out
    assert len(_store(env).corrections()) == 1


def test_correct_by_logged_path_and_prefix_reads_the_file_predict_read(env: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    img = _image(env, "b.png", 2)
    sha = _log(env, img, "Particles")
    assert _run(env, "correct", sha[:8], "--label", "Fibres") == 0  # bytes from the logged origin
    assert (env["fb"] / "Fibres" / f"{sha}.png").is_file()
    gone = _image(env, "gone.png", 3)
    gone_sha = _log(env, gone)
    gone.unlink()
    capsys.readouterr()
    assert _run(env, "correct", str(gone), "--label", "Particles") == 1  # the logged path, file deleted since
    err = capsys.readouterr().err
    assert f"{gone_sha[:12]} was read from {gone}, which is gone" in err and "emassist correct PATH" in err
    assert _run(env, "correct", gone_sha, "--label", "Particles") == 1
    assert "which is gone" in capsys.readouterr().err
    web = _image(env, "upload.png", 4)
    web_sha = _log(env, web, origin="upload.png")  # the page's upload name: no file here
    web.unlink()
    assert _run(env, "correct", web_sha[:12], "--label", "Fibres") == 1
    assert "its bytes are not here" in capsys.readouterr().err
    assert len(_store(env).corrections()) == 1


def test_bad_input_exits_with_a_message(env: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    img = _image(env, "c.tif", 5)
    assert _run(env, "correct", str(img), "--label", "Nanotubes") == 2
    assert "unknown class 'Nanotubes' (the known classes: Fibres, Nanowires, Particles)" in capsys.readouterr().err
    assert _run(env, "correct", "ab12cd34ef", "--label", "Fibres") == 1
    assert "unknown sha256 'ab12cd34ef': no logged prediction" in capsys.readouterr().err
    assert _run(env, "correct", "no/such/file.tif", "--label", "Fibres") == 1
    assert "no such file, and no logged prediction read it" in capsys.readouterr().err
    a, b = _image(env, "d1.png", 6), _image(env, "d2.png", 7)
    sha_a, sha_b = _log(env, a), _log(env, b)
    common = next(i for i in range(64) if sha_a[i] != sha_b[i])
    if common >= 6:  # an ambiguous prefix (rare with two images; tested when it happens)
        assert _run(env, "correct", sha_a[:common], "--label", "Fibres") == 2
    assert _run(env, "feedback", "resolve", "abcdef", "--label", "Fibres") == 1
    assert "no corrected image's sha256 starts with 'abcdef'" in capsys.readouterr().err
    assert _run(env, "feedback", "resolve", sha_a[:8], "--label", "Nope") == 2
    assert "unknown class 'Nope'" in capsys.readouterr().err
    assert len(_store(env).corrections()) == 0


def test_conflict_is_listed_and_resolved(env: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    img = _image(env, "e.tif", 8)
    sha = _log(env, img)
    assert _run(env, "feedback", "list") == 0
    assert "no corrections" in capsys.readouterr().out
    assert _run(env, "correct", str(img), "--label", "Nanowires", "--who", "Ada") == 0
    assert _run(env, "correct", str(img), "--label", "Particles", "--who", "Bob") == 0
    out = capsys.readouterr().out
    assert "corrections disagree (Nanowires, Particles)" in out and "emassist feedback resolve" in out
    assert (env["fb"] / "_conflicting" / f"{sha}.tif").is_file()
    assert _run(env, "feedback", "list", "--conflicts") == 0
    out = capsys.readouterr().out
    assert "1 corrected images (1 conflicting)" in out and sha[:12] in out and "Nanowires, Particles" in out
    assert "left out of training" in out
    assert _run(env, "feedback", "resolve", sha[:12], "--label", "Particles", "--who", "Cy") == 0
    assert "resolved as Particles" in capsys.readouterr().out
    assert sorted(p.relative_to(env["fb"]).as_posix() for p in env["fb"].rglob("*.tif")) == [f"Particles/{sha}.tif"]
    assert _run(env, "feedback", "list", "--conflicts") == 0
    assert "no conflicting corrections" in capsys.readouterr().out


def _dvc_repo(root: Path) -> None:
    subprocess.run(["git", *GIT_IDENTITY, "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "core.site_cache_dir", str(root / ".dvc/site")],
                   cwd=root, check=True)  # fmt: skip


def test_feedback_commit_runs_dvc_add_and_push_only_with_a_remote(
    env: dict[str, Path],
    capsys,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    root = env["root"]
    _dvc_repo(root)
    monkeypatch.chdir(root)
    assert _run(env, "feedback", "commit") == 0
    assert "nothing to commit" in capsys.readouterr().out
    img = _image(env, "f.tif", 9)
    sha = _log(env, img)
    assert _run(env, "correct", str(img), "--label", "Fibres") == 0
    capsys.readouterr()
    assert _run(env, "feedback", "commit") == 0
    out = capsys.readouterr().out
    assert "dvc add: 1 folders" in out and "Fibres 1" in out and "no default DVC remote configured" in out
    assert (env["fb"] / "Fibres.dvc").is_file() and "/Fibres" in (env["fb"] / ".gitignore").read_text()
    remote = root.parent / f"{root.name}-remote"
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)], cwd=root, check=True)
    assert _run(env, "feedback", "commit") == 0
    assert "dvc push: sent to remote 'store'" in capsys.readouterr().out
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    assert any(p.read_bytes() == img.read_bytes() for p in pushed), pushed
    assert sha


def test_feedback_commit_outside_a_dvc_repository_says_so(env: dict[str, Path], capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    img = _image(env, "g.tif", 10)
    _log(env, img)
    assert _run(env, "correct", str(img), "--label", "Fibres") == 0
    monkeypatch.chdir(env["root"])
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(env["root"].parent))
    assert _run(env, "feedback", "commit") == 1
    assert "dvc add failed" in capsys.readouterr().err
