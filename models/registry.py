"""Short registered names for tokenizers and priors, so configs never carry import paths.

Each name maps to the module that registers it, so building a model imports only its own module.
"""

import importlib

from engine.errors import TesseraError

TOKENIZERS: dict[str, type] = {}
PRIORS: dict[str, type] = {}

TOKENIZER_MODULES = {
    "vq": "models.tokenizers.vq",
    "vq_gumbel": "models.tokenizers.gumbel",
    "rq": "models.tokenizers.rq",
    "kl": "models.tokenizers.kl",
}
PRIOR_MODULES = {
    "gpt": "models.priors.gpt",
    "rqtransformer": "models.priors.rqtransformer",
    "mar": "models.priors.mar",
    "vqdiffusion": "models.priors.vqdiffusion",
    "sundae": "models.priors.sundae",
}


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
    modules = TOKENIZER_MODULES if table is TOKENIZERS else PRIOR_MODULES
    if name not in table and name in modules:
        importlib.import_module(modules[name])
    if name not in table:
        known = ", ".join(sorted(set(modules) | set(table)))
        raise TesseraError(f"unknown {what} '{name}' in model.target; known {what}s: {known}")
    return table[name]
