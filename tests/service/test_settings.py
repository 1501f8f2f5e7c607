"""Settings: a bad environment value stops the start, naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import ClientSettings, SettingsError, load_settings, read_settings


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONLOOP_MAX_FILES", "lots")
    monkeypatch.setenv("VISIONLOOP_RETRAIN_SCHEDULE", "every tuesday")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "VISIONLOOP_MAX_FILES" in str(err.value)
    assert "VISIONLOOP_RETRAIN_SCHEDULE" in str(err.value)
    monkeypatch.setenv("VISIONLOOP_MAX_FILES", "3")
    monkeypatch.setenv("VISIONLOOP_RETRAIN_SCHEDULE", "*/5 * * * * */2")
    assert load_settings().max_files == 3


def test_training_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """VISIONLOOP_TRAIN_* (and VISIONLOOP_BACKBONE) are what a job takes where its request says
    nothing; unset, TrainConfig's own defaults."""
    assert load_settings().train_defaults() == {
        "backbone": "auto", "workers": 1, "gpu": False, "strategy": "feature-extract",
        "epochs": 5, "batch_size": 32}
    for name, value in {"BACKBONE": "efficientnet_lite0", "TRAIN_WORKERS": "4",
                        "TRAIN_GPU": "true", "TRAIN_STRATEGY": "finetune",
                        "TRAIN_EPOCHS": "12", "TRAIN_BATCH_SIZE": "64",
                        "TRAIN_PENDING_TIMEOUT_S": "90"}.items():
        monkeypatch.setenv(f"VISIONLOOP_{name}", value)
    settings = load_settings()
    assert settings.train_defaults() == {
        "backbone": "efficientnet_lite0", "workers": 4, "gpu": True, "strategy": "finetune",
        "epochs": 12, "batch_size": 64}
    assert settings.train_pending_timeout_s == 90.0


@pytest.mark.parametrize(("name", "value", "says"), [
    ("VISIONLOOP_TRAIN_WORKERS", "0", "greater than or equal to 1"),
    ("VISIONLOOP_TRAIN_WORKERS", "two", "valid integer"),
    ("VISIONLOOP_TRAIN_GPU", "maybe", "valid boolean"),
    ("VISIONLOOP_TRAIN_STRATEGY", "transfer", "'feature-extract', 'finetune' or 'partial'"),
    ("VISIONLOOP_TRAIN_EPOCHS", "1001", "less than or equal to 1000"),
    ("VISIONLOOP_TRAIN_BATCH_SIZE", "0", "greater than or equal to 1"),
    ("VISIONLOOP_TRAIN_PENDING_TIMEOUT_S", "0", "greater than or equal to 1"),
])
def test_a_bad_training_default_stops_the_start(monkeypatch: pytest.MonkeyPatch, name: str,
                                                 value: str, says: str) -> None:
    """The same limits as a request's (TrainConfig's), checked at start, naming the variable."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"{name}={value!r}" in str(err.value) and says in str(err.value)


SECRET = "hide-me-secret"  # too short for the API token, long enough to spot


def test_no_secret_in_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token that breaks its rule is named with the rule, never shown (nor its length)."""
    monkeypatch.setenv("VISIONLOOP_API_TOKEN", SECRET)
    monkeypatch.setenv("VISIONLOOP_PREDICT_TOKEN", "p-1234")
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value)
    assert "VISIONLOOP_API_TOKEN: must be at least 16 characters" in text
    assert "VISIONLOOP_PREDICT_TOKEN: must be at least 8 characters" in text
    assert SECRET not in text and "p-1234" not in text and str(len(SECRET)) not in text
    monkeypatch.delenv("VISIONLOOP_API_TOKEN")
    monkeypatch.delenv("VISIONLOOP_PREDICT_TOKEN")
    with pytest.raises(SettingsError) as err:
        load_settings(api_token=SECRET)  # an explicit value: named by its field
    assert str(err.value) == "invalid settings:\n  api_token: must be at least 16 characters"


def test_tokens_are_secret_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONLOOP_API_TOKEN", SECRET * 2)
    monkeypatch.setenv("VISIONLOOP_PREDICT_TOKEN", " ")  # blank: unset
    settings = load_settings()
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == SECRET * 2 and settings.predict_token is None
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


def test_tokens_from_secret_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    api, predict = tmp_path / "api", tmp_path / "predict"
    api.write_text(SECRET * 2 + "\n")  # as `echo ... > file` writes it
    predict.write_text("predict-secret")
    monkeypatch.setenv("VISIONLOOP_API_TOKEN_FILE", str(api))
    monkeypatch.setenv("VISIONLOOP_PREDICT_TOKEN_FILE", str(predict))
    settings = load_settings()
    assert settings.api_token is not None and settings.predict_token is not None
    assert settings.api_token.get_secret_value() == SECRET * 2
    assert settings.predict_token.get_secret_value() == "predict-secret"
    monkeypatch.setenv("VISIONLOOP_API_TOKEN_FILE", "")  # blank: unset
    assert load_settings().api_token is None


@pytest.mark.parametrize(("content", "says"), [
    (None, "cannot be read (No such file or directory)"),
    (b"", "is empty"),
    (SECRET.encode(), "holds a token shorter than 16 characters"),
    ((SECRET * 2 + "\n" + SECRET * 2).encode(), "holds more than one line"),
])
def test_an_unusable_secret_file_stops_the_start(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, content: bytes | None,
                                                 says: str) -> None:
    path = tmp_path / "visionloop_api_token"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("VISIONLOOP_API_TOKEN_FILE", str(path))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value) == f"invalid settings:\n  VISIONLOOP_API_TOKEN_FILE: {path} {says}"


def test_a_token_and_its_file_together_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """The service will not guess which was meant; the CLI sends the token it was given."""
    path = tmp_path / "token"
    path.write_text("f" * 20)
    monkeypatch.setenv("VISIONLOOP_API_TOKEN_FILE", str(path))
    monkeypatch.setenv("VISIONLOOP_API_TOKEN", SECRET * 2)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value) == ("invalid settings:\n  VISIONLOOP_API_TOKEN and "
                              "VISIONLOOP_API_TOKEN_FILE are both set; set one of them")
    client = read_settings(ClientSettings)
    assert client.api_token is not None and client.api_token.get_secret_value() == SECRET * 2
    monkeypatch.delenv("VISIONLOOP_API_TOKEN")
    client = read_settings(ClientSettings)
    assert client.api_token is not None and client.api_token.get_secret_value() == "f" * 20
