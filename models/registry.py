"""Short registered names for tokenizers and priors, so configs never carry import paths."""

from engine.errors import TesseraError

TOKENIZERS: dict[str, type] = {}
PRIORS: dict[str, type] = {}


def register_tokenizer(name: str):
    def wrap(cls):
        TOKENIZERS[name] = cls
        cls.registered_name = name
        return cls

    return wrap


def register_prior(name: str):
    def wrap(cls):
        PRIORS[name] = cls
        cls.registered_name = name
        return cls

    return wrap


def lookup(table: dict, name: str, what: str):
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise TesseraError(f"unknown {what} '{name}' in model.target; registered {what}s: {known}")
    return table[name]
