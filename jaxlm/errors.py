"""The error types jaxlm raises for bad input: each message names the key, file or value at fault."""


class ConfigError(ValueError):
    """A configuration problem (a key, a value, a combination, a mesh); the message names it."""


class DataError(ValueError):
    """Missing, unreadable or malformed data, tokenizer, checkpoint or model files; the message names the file."""


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError naming `key` and the valid values unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
