"""emassist.data.s3 takes its settings from S3Params, checked by the settings (no second set of checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emassist.config.settings import ParamsError, S3Params
from emassist.data import s3


@pytest.mark.parametrize("call", ["pull", "push"])
def test_a_missing_bucket_is_a_params_error_before_any_client(
    call: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients = []
    monkeypatch.setattr(s3, "make_client", lambda *a, **k: clients.append(1))
    with pytest.raises(ParamsError, match=r"^s3\.bucket: not set"):
        if call == "pull":
            s3.pull(S3Params(), tmp_path, ["Tips"], progress=False)
        else:
            s3.push(S3Params(), tmp_path, progress=False)
    assert not clients
