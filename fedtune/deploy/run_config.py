"""The config a deployed site trains with: a declared allowlist of the server's fields, the rest its own.

The run config arrives from the server as JSON, and the server may be hostile.  So it is
read with :func:`json.loads` (no OmegaConf, so no ``${oc.env:...}`` or any other
interpolation can resolve on the site), any string containing ``${`` anywhere refuses the
run, and only the fields below are taken, each type-checked: the shape of the shared
model and adapter and the sequence length, which every party must agree on.  Data, paths,
budget, δ, accountant, device, threads and seeds are the site's alone (``site.yaml``);
the round's DP-SGD parameters travel in each round's config and meet the site's policy.
A run that sets ``train.seed`` is refused: whoever knows the seed can regenerate the
site's noise and subtract it.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from fedtune.config import FedtuneConfig
from fedtune.deploy.site_config import SiteConfig
from fedtune.errors import ConfigError
from fedtune.federation.protocol import REFUSED_RUN_CONFIG, Refusal
from fedtune.tasks import get_task
from fedtune.validation import validate


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _modules(value: Any) -> bool:
    return value is None or (isinstance(value, list) and 0 < len(value) <= 64
                             and all(isinstance(v, str) and v.isidentifier() for v in value))


# (dotted field, type check) of everything a site takes from the server's run config.
SERVER_FIELDS: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("model.tiny.hidden_size", _int), ("model.tiny.num_layers", _int), ("model.tiny.num_heads", _int),
    ("model.tiny.intermediate_size", _int), ("model.tiny.max_position_embeddings", _int),
    ("model.lora.rank", _int), ("model.lora.alpha", _number), ("model.lora.dropout", _number),
    ("model.lora.target_modules", _modules), ("model.lora.use_dora", lambda v: isinstance(v, bool)),
    ("model.seed", _int), ("model.task", lambda v: isinstance(v, str)), ("model.num_labels", _int),
    ("model.dtype", lambda v: isinstance(v, str)),
    ("data.max_length", _int),
)
MAX_RUN_CONFIG_BYTES = 1 << 20


def _refuse(detail: str) -> Refusal:
    return Refusal(REFUSED_RUN_CONFIG, detail)


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_interpolation(k) or _has_interpolation(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


def _lookup(tree: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _assign(cfg: FedtuneConfig, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    node: Any = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, name, float(value) if isinstance(getattr(node, name), float) else value)


def use_site_model(cfg: FedtuneConfig, site: SiteConfig) -> None:
    """Point ``cfg.model`` at this site's own copy of the base model (never the server's path).

    ``fedtune client fingerprint`` and every round use this one rule, so the fingerprint a
    site pins is the one it computes when it trains.
    """
    cfg.model.path = str(site.resolve(site.model_path)) if site.model_path is not None else None
    cfg.model.gguf_file = site.model_gguf_file
    cfg.model.cache_dir = str(site.resolve(site.model_cache_dir)) if site.model_cache_dir is not None else None
    cfg.model.gradient_checkpointing = site.model_gradient_checkpointing
    cfg.model.quantization = site.model_quantization


def parse_server_config(raw: str) -> dict:
    """The server's run config as plain JSON; Refusal if it is not an object or holds ``${``."""
    if not isinstance(raw, str) or len(raw) > MAX_RUN_CONFIG_BYTES:
        raise _refuse("the run config is not a string of at most 1 MiB")
    try:
        tree = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, RecursionError):
        raise _refuse("the run config is not valid JSON") from None
    if not isinstance(tree, dict):
        raise _refuse("the run config is not a JSON object")
    if _has_interpolation(tree):
        raise _refuse("the run config holds an interpolation ('${'); server values are never resolved here")
    has_seed, seed = _lookup(tree, "train.seed")
    if has_seed and seed is not None:
        raise _refuse("the run sets train.seed; a deployed site draws noise and sampling from OS entropy only")
    return tree


def site_run_config(raw: str, site: SiteConfig) -> FedtuneConfig:
    """The validated training config of this site for the server's run config ``raw``."""
    tree = parse_server_config(raw)
    cfg = FedtuneConfig()
    for dotted, is_valid in SERVER_FIELDS:
        present, value = _lookup(tree, dotted)
        if not present:
            continue
        if not is_valid(value):
            raise _refuse(f"run config field '{dotted}' has a value of the wrong type")
        _assign(cfg, dotted, value)
    cfg.data.path = str(site.resolve(site.data.path))
    cfg.data.format = site.data.format
    cfg.data.group_field = site.data.group_field
    cfg.data.label_field = site.data.label_field
    cfg.data.label_names = list(site.data.label_names) if site.data.label_names is not None else None
    cfg.privacy.target_epsilon = site.budget.epsilon
    cfg.privacy.delta = site.budget.delta
    cfg.privacy.accountant = site.budget.accountant
    cfg.privacy.enabled = site.budget.require_privacy
    use_site_model(cfg, site)
    cfg.train.torch_threads = site.torch_threads
    cfg.train.seed = None
    # The secure-aggregation parameters of a round travel in its stage messages.
    cfg.secagg.enabled = False
    try:
        if cfg.data.format == "auto":
            # The site's "auto" reads the run's task's own default format (a classifier's: labelled).
            cfg.data.format = get_task(cfg.model.task).record_formats[0]
        validate(cfg)
    except ConfigError as exc:
        raise _refuse(f"the run's settings do not validate here: field {exc.field}") from None
    return cfg
