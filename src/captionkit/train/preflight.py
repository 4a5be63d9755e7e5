"""Checks a training run makes before it loads a model or writes a file.

Why: offline, ``from_pretrained`` of a hub id that is not cached spent ~50 s on retries
and ended in a long wrapped transformers error, after the run had already created its
output folder. Here the model is looked up the way ``captionkit caption`` does it
(:func:`captionkit.models.read_model_config`: the local cache first, then a quick
reachability test), so an offline machine gets one sentence within a second, worded for
a config file instead of a ``--model`` option.
"""

from __future__ import annotations

from captionkit.train.config import ConfigError

_MODEL_OPTION_FIXES = (
    ("pass --model LOCAL_FOLDER", "set {key}: LOCAL_FOLDER in the config (or pass --set {key}=LOCAL_FOLDER)"),
    ("point --model at a saved model folder", "point {key} in the config at a saved model folder"),
)


def for_config(message: str, key: str) -> str:
    """A ``--model`` hint from :mod:`captionkit.models` reworded for the config key ``key``."""
    for option, setting in _MODEL_OPTION_FIXES:
        message = message.replace(option, setting.format(key=key))
    return message


def check_hub_model(name: str, revision: str | None = None, key: str = "model") -> bool:
    """Fail in one sentence unless the model ``name`` can be loaded; return True when it must load offline.

    A local folder needs a ``config.json``; a hub id needs its ``config.json`` in the local
    cache or a reachable Hub. True means the Hub is out of reach but the model is cached:
    load it with ``local_files_only=True`` so nothing waits on retries.
    """
    from captionkit.core.errors import ModelNotAvailableError
    from captionkit.models import hub_reachable, is_local, read_model_config

    try:
        read_model_config(name, revision=revision)
    except ModelNotAvailableError as error:
        raise ConfigError(for_config(str(error), key)) from None
    except ValueError as error:  # a config.json that is not JSON
        raise ConfigError(f"{name}: its config.json cannot be read ({error}); fix {key} in the config") from None
    if is_local(name):
        return False
    return not hub_reachable()


def model_load_failed(name: str, error: BaseException, key: str = "model") -> Exception:
    """The one sentence for a model whose files could not all be loaded (after :func:`check_hub_model`),
    or for a package that failed to import while loading it (the environment, not the folder)."""
    from captionkit.core.environment import broken_environment
    from captionkit.models import is_local, model_unavailable

    broken = broken_environment(error)
    if broken is not None:
        return broken

    if is_local(name):
        return ConfigError(f"{name}: not a loadable model folder ({type(error).__name__}: {error}); point {key} "
                           "in the config at a folder saved with save_pretrained")
    return ConfigError(for_config(str(model_unavailable(name, error)), key))
