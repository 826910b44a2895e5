"""The error types jaxlm raises for bad input: each message names the key, file or value at fault."""


class ConfigError(ValueError):
    """A configuration problem (a key, a value, a combination, a mesh); the message names it."""


class DataError(ValueError):
    """Missing, unreadable or malformed data, tokenizer, checkpoint or model files; the message names the file."""
