"""Card profiles: for each domain, the keys a card gets, the algorithm of the transport key that wraps them and the
algorithm that signs the domain's section. Data in kms/policies/profiles/*.yaml, validated at load.

A profile that names an unknown recipe, bad recipe parameters, an unknown field, an unknown transport or signature
algorithm, SM4 card keys under a non-SM4 transport key, or a master key the registry does not hold is rejected with
the file, the line and the reason (ProfileError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kms.cards import recipes
from kms.cards.cardid import CardIdentity
from kms.errors import ProfileError
from kms.hsm.types import Algorithm, SignatureAlgorithm
from kms.registry import DOMAINS, KeyKind
from kms.validation import NAME

#: A domain's ``transport:`` and ``signature:`` values in a profile, and what each means (defaults: the first).
TRANSPORTS = {"aes256": Algorithm.AES256, "sm4": Algorithm.SM4}
SIGNATURES = {"ecdsa-p256-sha256": SignatureAlgorithm.ECDSA_P256_SHA256, "sm2-sm3": SignatureAlgorithm.SM2_SM3}
DEFAULT_TRANSPORT = Algorithm.AES256
DEFAULT_SIGNATURE = SignatureAlgorithm.ECDSA_P256_SHA256
_T = TypeVar("_T")


class _Map(dict[str, Any]):
    """A YAML mapping that remembers the line of itself and of each key (1-based)."""

    line = 0
    lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    result = _Map()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ProfileError(str(node.start_mark.name), key_node.start_mark.line + 1, "keys must be plain text")
        if key in result:
            raise ProfileError(str(node.start_mark.name), key_node.start_mark.line + 1, f"duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


class _Seq(list[Any]):
    """A YAML sequence that remembers the line of each item (1-based)."""

    lines: list[int]


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(loader.construct_object(item, deep=True) for item in node.value)
    result.lines = [item.start_mark.line + 1 for item in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


@dataclass(frozen=True)
class KeySpec:
    """One key a card gets: its name in the bundle, usage, algorithm, recipe and the master key it comes from."""

    name: str
    usage: str
    recipe: recipes.Recipe
    master_key: str

    @property
    def algorithm(self) -> Algorithm:
        return self.recipe.algorithm


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    domains: dict[str, tuple[KeySpec, ...]]
    source: str
    #: Whether a card's PAN must pass the Luhn check (default true); ``pan_luhn: false`` opts a test range out.
    pan_luhn: bool = True
    #: Per domain, the algorithm of the transport key its card keys are wrapped under (absent: AES-256).
    transports: dict[str, Algorithm] = field(default_factory=dict)
    #: Per domain, the algorithm its bundle section is signed with (absent: ECDSA P-256 with SHA-256).
    signatures: dict[str, SignatureAlgorithm] = field(default_factory=dict)

    def keys(self, domain: str) -> tuple[KeySpec, ...]:
        return self.domains.get(domain, ())

    def card_fields(self, domain: str) -> frozenset[str]:
        return frozenset().union(*(k.recipe.card_fields for k in self.keys(domain)))

    def master_keys(self, domain: str) -> list[str]:
        return sorted({k.master_key for k in self.keys(domain)})

    def transport(self, domain: str) -> Algorithm:
        """The algorithm of the transport key that wraps this domain's card keys: AES256 (AES key wrap with
        padding) or SM4 (SM4-ECB). The profile's ``transport:``; AES256 when it names none."""
        return self.transports.get(domain, DEFAULT_TRANSPORT)

    def signature(self, domain: str) -> SignatureAlgorithm:
        """The algorithm this domain's bundle section is signed with: the profile's ``signature:``; ECDSA P-256
        with SHA-256 when it names none."""
        return self.signatures.get(domain, DEFAULT_SIGNATURE)

    def check_card(self, card: CardIdentity) -> None:
        """A card's fields as this profile requires them beyond their format: the PAN's Luhn check digit (unless
        the profile opts out). InvalidArgument naming the field."""
        if self.pan_luhn:
            card.check_luhn()


def load(path: Path, master_keys: dict[str, set[str]] | None = None) -> Profile:
    """Load and validate one profile. ``master_keys`` maps a domain to the master key names it holds; when given,
    every reference must be among them."""
    src = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ProfileError(src, 0, f"cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ProfileError(src, line, "not UTF-8 text (profiles are UTF-8)") from None
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except ProfileError as error:
        raise ProfileError(src, error.line, error.reason) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", error)
        raise ProfileError(src, mark.line + 1 if mark else 0, f"not valid YAML: {problem}") from None
    if not isinstance(doc, _Map):
        raise ProfileError(src, 1, "a profile is a mapping with 'profile', 'description' and 'domains'")
    _only(src, doc, {"profile", "description", "domains", "pan_luhn"})
    name = doc.get("profile")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ProfileError(src, doc.lines.get("profile", doc.line), "'profile' must be a lower-case name")
    domains_doc = doc.get("domains")
    if not isinstance(domains_doc, _Map) or not domains_doc:
        raise ProfileError(src, doc.lines.get("domains", doc.line), "'domains' must map hrss and/or bank to keys")
    domains: dict[str, tuple[KeySpec, ...]] = {}
    transports: dict[str, Algorithm] = {}
    signatures: dict[str, SignatureAlgorithm] = {}
    for domain, body in domains_doc.items():
        line = domains_doc.lines[domain]
        if domain not in DOMAINS:
            raise ProfileError(src, line, f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
        if not isinstance(body, _Map):
            raise ProfileError(src, line, f"domain {domain}: expected a mapping with 'keys'")
        _only(src, body, {"keys", "transport", "signature"})
        entries = body.get("keys")
        if not isinstance(entries, list) or not entries:
            raise ProfileError(src, body.lines.get("keys", line), f"domain {domain}: 'keys' must be a non-empty list")
        known = None if master_keys is None else master_keys.get(domain, set())
        domains[domain] = _keys(src, domain, entries, known)
        transports[domain] = _choice(src, body, domain, "transport", TRANSPORTS, DEFAULT_TRANSPORT)
        signatures[domain] = _choice(src, body, domain, "signature", SIGNATURES, DEFAULT_SIGNATURE)
        _check_transport(src, body.lines.get("transport", line), domain, domains[domain], transports[domain])
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(src, doc.lines["description"], "'description' must be text")
    pan_luhn = doc.get("pan_luhn", True)
    if not isinstance(pan_luhn, bool):
        raise ProfileError(src, doc.lines["pan_luhn"], "'pan_luhn' must be true or false")
    return Profile(name=name, description=description, domains=domains, source=src, pan_luhn=pan_luhn,
                   transports=transports, signatures=signatures)


def load_dir(directory: Path, master_keys: dict[str, set[str]] | None = None) -> dict[str, Profile]:
    """Every *.yaml profile in a directory, by profile name."""
    profiles: dict[str, Profile] = {}
    for path in sorted(directory.glob("*.yaml")):
        profile = load(path, master_keys)
        if profile.name in profiles:
            raise ProfileError(str(path), 1, f"profile {profile.name!r} is also defined in "
                                             f"{profiles[profile.name].source}")
        profiles[profile.name] = profile
    return profiles


def _keys(src: str, domain: str, entries: list[Any], known: set[str] | None) -> tuple[KeySpec, ...]:
    specs: list[KeySpec] = []
    seen: set[str] = set()
    lines = getattr(entries, "lines", [0] * len(entries))
    for entry, line in zip(entries, lines, strict=True):
        if not isinstance(entry, _Map):
            raise ProfileError(src, line, f"domain {domain}: each key is a mapping with name, usage, recipe, "
                                          "master_key")
        _only(src, entry, {"name", "usage", "recipe", "params", "master_key"})
        for required in ("name", "usage", "recipe", "master_key"):
            if not isinstance(entry.get(required), str):
                raise ProfileError(src, entry.line, f"key entry needs '{required}' (text)")
        name = entry["name"]
        if not NAME.fullmatch(name):
            raise ProfileError(src, entry.lines["name"], f"key name {name!r} must be a lower-case name")
        if name in seen:
            raise ProfileError(src, entry.lines["name"], f"key {name!r} appears twice in domain {domain}")
        seen.add(name)
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise ProfileError(src, entry.lines["params"], f"key {name}: 'params' must be a mapping")
        try:
            recipe = recipes.build(entry["recipe"], params)
        except ValueError as error:
            where = entry.lines["params"] if "params" in entry and "unknown recipe" not in str(error) \
                else entry.lines["recipe"]
            raise ProfileError(src, where, f"key {name}: {error}") from None
        master = entry["master_key"]
        if known is not None and master not in known:
            raise ProfileError(
                src, entry.lines["master_key"],
                f"key {name}: master key {master!r} does not exist in domain {domain}",
            )
        specs.append(KeySpec(name=name, usage=entry["usage"], recipe=recipe, master_key=master))
    return tuple(specs)


def _choice(src: str, body: _Map, domain: str, key: str, choices: dict[str, _T], default: _T) -> _T:
    if key not in body:
        return default
    value = body[key]
    if not isinstance(value, str) or value not in choices:
        raise ProfileError(src, body.lines[key], f"domain {domain}: '{key}' must be one of {', '.join(choices)}, "
                                                 f"not {value!r}")
    return choices[value]


def _check_transport(src: str, line: int, domain: str, keys: tuple[KeySpec, ...], transport: Algorithm) -> None:
    """SM4 card keys travel under an SM4 transport key only: a card on the national algorithms keeps its keys under
    them from the HSM to the card (docs/architecture.md, section 7). 3DES card keys may travel under either."""
    if transport is Algorithm.SM4:
        return
    for spec in keys:
        if spec.algorithm is Algorithm.SM4:
            raise ProfileError(src, line,
                               f"domain {domain}: key {spec.name} is an SM4 key, so the domain needs 'transport: sm4' "
                               f"(it has {transport.value.lower()})")


def _only(src: str, node: _Map, allowed: set[str]) -> None:
    for key in node:
        if key not in allowed:
            raise ProfileError(src, node.lines[key], f"unknown field {key!r}; allowed: {', '.join(sorted(allowed))}")


def master_key_names(registry: Any) -> dict[str, set[str]]:
    """Master key names per domain, as the registry holds them (for reference checks at load)."""
    return {d: registry.names(d, KeyKind.MASTER) for d in DOMAINS}
