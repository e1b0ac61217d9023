"""Typed configs, YAML presets and dotted command-line overrides.

Every config is a pydantic model that forbids unknown fields, so a typo in a preset
or an override fails at once with the field's path. Presets are YAML files, shipped in
``raypipe/configs/<kind>/`` (:mod:`raypipe.presets`) and named by preset name or path; a
preset may name another with ``base: other.yaml`` and override parts of it. Overrides
look like ``render.batch_size=8`` (values parsed as YAML).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from raypipe.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class Config(BaseModel):
    """Base: unknown fields are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_preset(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving ``base:`` (relative to the preset's folder)."""
    path = Path(path)
    if not path.is_file():
        folder = path.parent
        known = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
        hint = f" YAML files in {folder}: {', '.join(known)}." if known else ""
        raise ConfigError(f"config file {path} does not exist.{hint}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level")
    base = data.pop("base", None)
    if base:
        parent = read_yaml_preset(path.parent / base, _seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


def iter_fields(model: type[BaseModel], prefix: str = ""):
    """Every field of ``model`` and of its nested configs, depth first, as
    ``(dotted.path, FieldInfo, annotation)``; the annotation has ``| None`` removed.
    A nested config is yielded before its own fields."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = _without_none(info.annotation)
        yield path, info, annotation
        if _is_config(annotation):
            yield from iter_fields(annotation, path + ".")


def _without_none(annotation: Any) -> Any:
    import types
    from typing import Union, get_args, get_origin

    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unknown_field(model: type[BaseModel], where: list[str], name: str, item: str) -> ConfigError:
    """The error for override ``item`` naming ``name``, which ``where``'s config lacks:
    the closest field (a sibling, else any field whose last part is close) and the
    fields that exist there."""
    import difflib

    node: type[BaseModel] = model
    for part in where:
        node = _without_none(node.model_fields[part].annotation)
    owner = ".".join(where)
    prefix = owner + "." if owner else ""
    siblings = list(node.model_fields)
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {prefix}{close[0]}?"
    else:
        paths = [p for p, _, _ in iter_fields(model)]
        by_last = {p.rsplit(".", 1)[-1]: p for p in reversed(paths)}
        close = difflib.get_close_matches(name, list(by_last), n=1, cutoff=0.75)
        whole = difflib.get_close_matches(prefix + name, paths, n=1, cutoff=0.75)
        best = by_last[close[0]] if close else whole[0] if whole else None
        hint = f"did you mean {best}?" if best else "no field has a similar name."
    what = f"{owner} ({node.__name__})" if owner else model.__name__
    return ConfigError(
        f"override {item!r}: {what} has no field {name!r}; {hint}\n"
        f"Fields of {what}: {', '.join(siblings)}"
    )


def _override_path(
    model: type[BaseModel], dotted: str, item: str, seeds: dict[int, Any] | None = None
) -> list[str]:
    """Split ``dotted`` along ``model``'s fields. After a dict-valued field the rest is
    one key, dots included (``llm.prices.gpt-4.1-mini``); an unknown field raises
    :class:`ConfigError` with the closest name. ``seeds`` receives, by position in the
    path, the default of each dict-valued field passed through, so that setting one key
    keeps the others (``llm.prices.X=...`` adds a price, the default prices stay)."""
    from typing import get_args, get_origin

    parts = dotted.split(".")
    path: list[str] = []
    node: type[BaseModel] | None = model
    i = 0
    while i < len(parts):
        if node is None:  # below a plain value: pydantic reports the type error
            path += parts[i:]
            break
        name = parts[i]
        if name not in node.model_fields:
            raise _unknown_field(model, path, name, item)
        path.append(name)
        i += 1
        annotation = _without_none(node.model_fields[name].annotation)
        if _is_config(annotation):
            node = annotation
        elif get_origin(annotation) is dict and i < len(parts):
            if seeds is not None:
                default = node.model_fields[name].get_default(call_default_factory=True)
                if isinstance(default, dict):
                    seeds[len(path) - 1] = default
            args = get_args(annotation)
            value = _without_none(args[1]) if len(args) == 2 else None
            if _is_config(value):  # dict of configs: KEY.field...; the key has no dots
                path.append(parts[i])
                i += 1
                node = value
            else:
                path.append(".".join(parts[i:]))
                break
        else:
            node = None
    return path


def apply_overrides(
    data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``8``, ``true``, ``[a, b]``).

    With ``model`` (what :func:`load_config` passes), paths follow its fields: an unknown
    field fails here, naming the closest one (``render.batchsize`` -> ``render.batch_size``),
    and the key of a dict-valued field may contain dots
    (``llm.prices.gpt-4.1-mini=[0.4, 1.6]``). Without it, every dot separates a level.
    """
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.path=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        dotted = dotted.strip()
        seeds: dict[int, Any] = {}
        parts = _override_path(model, dotted, item, seeds) if model else dotted.split(".")
        for k, part in enumerate(parts[:-1]):
            child = node.get(part, seeds.get(k))
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _closest_hint(model: type[BaseModel], err: dict) -> str:
    """`` (did you mean X?)`` for an unknown field of a preset (pydantic's extra_forbidden)."""
    loc = [str(p) for p in err.get("loc", ())]
    if err.get("type") != "extra_forbidden" or not loc:
        return ""
    try:
        _override_path(model, ".".join(loc), ".".join(loc))
    except ConfigError as e:
        hint = str(e).split("; ", 1)[-1].split("\n", 1)[0]
        return f" ({hint})" if hint.startswith("did you mean") else ""
    except Exception:
        return ""
    return ""


def build_config(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate ``data`` as ``cls``; errors name every bad field's dotted path."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}{_closest_hint(cls, err)}")
        fields = ", ".join(cls.model_fields)
        raise ConfigError(
            f"{source}: invalid {cls.__name__}:\n"
            + "\n".join(lines)
            + f"\nTop-level fields: {fields}"
        ) from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Preset (optional: a preset name of ``cls``'s kind, or a path) + dotted overrides
    -> validated config."""
    if path:
        from raypipe import presets

        kind = presets.KIND_OF.get(cls.__name__)
        path = presets.resolve(path, kind) if kind else Path(path)
    data = read_yaml_preset(path) if path else {}
    data = apply_overrides(data, list(overrides), cls)
    return build_config(cls, data, source=str(path or "overrides"))


SECRET_MARKERS = ("key", "token", "secret", "password")
#: Query parameters whose values are credentials (names compared lower-cased, as substrings).
SECRET_PARAM_MARKERS = (*SECRET_MARKERS, "passwd", "pwd", "sig", "auth", "credential")


def _secret_param(name: str) -> bool:
    return any(m in unquote(name).lower() for m in SECRET_PARAM_MARKERS)


def _redact_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        parts.append(f"{name}=***" if eq and value and _secret_param(name) else item)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: the ``user:password@`` part and
    the values of query parameters named like a key, token, secret, password or
    signature (``api-key``, ``key``, ``token``, ``sig``, ...). Anything else is kept as
    written; a string that is not a ``scheme://`` URL comes back unchanged.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit(
        parts._replace(
            netloc=netloc, query=_redact_query(parts.query), fragment=_redact_query(parts.fragment)
        )
    )


def url_secrets(url: str | None) -> list[str]:
    """The credential strings inside ``url`` (as written and percent-decoded), longest
    first: what must be scrubbed from any text that might quote the URL."""
    if not url or "://" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        user, colon, password = userinfo.partition(":")
        found.add(userinfo)
        found.add(password if colon else user)  # a lone user name is a key (https://KEY@host)
    for section in (parts.query, parts.fragment):
        for item in section.split("&"):
            name, eq, value = item.partition("=")
            if eq and value and _secret_param(name):
                found.add(value)
    found |= {unquote(v) for v in found}
    return sorted((v for v in found if len(v) >= 4), key=len, reverse=True)


#: Field names whose values are secrets, matched on the whole name or its last words:
#: ``api_key``, ``openai_api_key``, ``aws_secret_access_key``, ``client_secret``,
#: ``password``, ``hf_token``, ``access_token``, ``token``, ``key``, ... but not
#: ``image_token``, ``pad_token``, ``max_tokens``, ``cache_key`` or ``api_key_env`` (the
#: *name* of a variable).
_SECRET_FIELD = re.compile(
    r"(?:^|[_.-])(?:api[_-]?key|access[_-]?key(?:[_-]?id)?|secret[_-]?key|private[_-]?key"
    r"|secret|password|passwd|passphrase|credentials?|authorization|auth"
    r"|(?:access|auth|api|bearer|id|refresh|session|hf|github|gh|slack)[_-]?token)$"
    r"|^(?:key|token|pwd)$",
    re.IGNORECASE,
)

#: Well-known credential formats, redacted wherever they appear in a value.
_SECRET_VALUE = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|(?:AKIA|ASIA)[A-Z0-9]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35})"
)


def is_secret_field(name: str) -> bool:
    """True for a field named like a credential (see :data:`_SECRET_FIELD`)."""
    return bool(_SECRET_FIELD.search(name))


def redacted(config: BaseModel | dict) -> dict[str, Any]:
    """Config as a plain dict for manifests and lineage files, with secrets replaced.

    Keys are never stored in configs (only the *name* of their environment variable),
    so this is a second line of defence. Replaced with ``***``: string values of fields
    named like a credential (:func:`is_secret_field`: ``api_key``, ``password``,
    ``hf_token``, ...; not ``image_token`` or ``max_tokens``), credentials inside URLs
    (``redact_url``: ``user:password@``, ``?api-key=...``), well-known key formats
    (``sk-...``, ``hf_...``, ``AKIA...``, ...) anywhere in a value, and any value held in
    an environment variable named like a key, token, secret or password.
    """
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    secrets = {
        v
        for k, v in os.environ.items()
        if v and len(v) >= 8 and any(m in k.lower() for m in SECRET_MARKERS)
    }

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: scrub(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str):
            if node in secrets or (node and is_secret_field(key)):
                return "***"
            node = _SECRET_VALUE.sub("***", redact_url(node))
            for secret in secrets:
                node = node.replace(secret, "***")
        return node

    return scrub(data)


__all__ = [
    "Config",
    "apply_overrides",
    "build_config",
    "load_config",
    "read_yaml_preset",
    "is_secret_field",
    "iter_fields",
    "redact_url",
    "redacted",
    "url_secrets",
    "model_validator",
]
