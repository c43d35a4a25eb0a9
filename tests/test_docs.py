"""The docs say what the code does: every message type, state field and setting is documented."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from multibot import protocol
from multibot.config import MasterConfig, WorkerTemplate, settings_table
from multibot.heartbeat import Heartbeat
from multibot.state import state_models

DOCS = Path(__file__).resolve().parent.parent / "docs"


def fields_of(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every field name of a model and of the models nested in it."""
    seen = seen or set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for f in model.model_fields.values():
        for arg in [f.annotation, *typing.get_args(f.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    names |= fields_of(inner, seen)
    return names


def payload_models() -> list[type[BaseModel]]:
    union = typing.get_args(protocol.Payload)[0]
    return list(typing.get_args(union))


def test_every_message_type_and_field_is_in_protocol_md() -> None:
    text = (DOCS / "protocol.md").read_text()
    for model in payload_models():
        kind = model.model_fields["type"].default
        assert f"**`{kind}`**" in text, f"{kind} is not documented"
        for name in fields_of(model) - {"type"}:
            assert f"`{name}`" in text, f"{kind}.{name} is not documented"
    for name in protocol.Envelope.model_fields:
        assert f"`{name}`" in text, f"envelope field {name} is not documented"


def test_protocol_md_names_no_message_type_that_does_not_exist() -> None:
    documented = set(re.findall(r"\*\*`([A-Z_]+)`\*\*", (DOCS / "protocol.md").read_text()))
    assert documented == set(typing.get_args(protocol.MessageType))


def test_every_state_field_is_in_state_md() -> None:
    text = (DOCS / "state.md").read_text()
    for name, model in [*state_models().items(), ("heartbeat", Heartbeat)]:
        for field in fields_of(model):
            assert f"`{field}`" in text or f"**`{field}`**" in text, f"{name}.{field} missing"


def test_configuration_md_matches_the_settings() -> None:
    text = (DOCS / "configuration.md").read_text()
    for model in (MasterConfig, WorkerTemplate):
        assert settings_table(model) in text, (
            f"docs/configuration.md is out of date for {model.__name__}: regenerate its table "
            "with multibot.config.settings_table"
        )


def test_shipped_config_files_are_valid() -> None:
    from multibot.config import load_master, load_worker
    from multibot.layout import Home

    home = Home(DOCS.parent)
    assert load_master(home) == MasterConfig()
    assert load_worker(home) == WorkerTemplate()


def test_the_old_name_of_max_attempts_is_still_read() -> None:
    from multibot.config import MasterConfig

    assert MasterConfig.model_validate({"verify_attempts": 5}).max_attempts == 5
    assert MasterConfig.model_validate({"max_attempts": 2}).max_attempts == 2
