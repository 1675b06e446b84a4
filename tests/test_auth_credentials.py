"""Credentials: from an environment variable or an owner-only file, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.archive.auth import AuthError, Credentials, load_credentials, safe_error_text
from streamer.config import AuthConfig


def test_password_from_env_and_hidden_in_repr() -> None:
    creds = load_credentials(AuthConfig(username="ann", password_env="PW"), environ={"PW": "s3cret&x"})
    assert creds.password == "s3cret&x"
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds) and "ann" in repr(creds)
    assert "s3cret" not in creds.scrub("http://h/login.do?josso_password=s3cret%26x and s3cret&x")


def test_missing_env_names_the_login_and_variable() -> None:
    with pytest.raises(AuthError, match="'ann'.*IRSA_PW"):
        load_credentials(AuthConfig(username="ann", password_env="IRSA_PW"), environ={})


def test_password_file_must_be_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("hunter2\n")
    path.chmod(0o640)
    with pytest.raises(AuthError, match="group or others.*chmod 600"):
        load_credentials(AuthConfig(username="ann", password_file=path))
    path.chmod(0o600)
    assert load_credentials(AuthConfig(username="ann", password_file=path)).password == "hunter2"


def test_error_text_drops_query_strings() -> None:
    err = OSError("Cannot connect to http://h/x?josso_password=pw&u=1 [refused]")
    text = safe_error_text(err, Credentials("ann", "pw"))
    assert "josso_password" not in text and "pw&" not in text and "http://h/x?" in text
