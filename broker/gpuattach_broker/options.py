"""Typed options for the broker's and the agent's traitlets applications.

A duration or a size is read when the configuration is loaded (command line
or config file), not later where it is used, so ``--ttl soon`` stops the
service at start with the option's name in the message. Each option is
declared once, as a trait; `command_line` derives its ``--name`` alias (or
its ``--name``/``--no-name`` flag for a Bool) from the trait itself.
"""

from __future__ import annotations

from typing import Any

from traitlets import Bool, HasTraits, TraitError, TraitType, Type

from gpuattach_broker.units import format_duration, parse_duration, parse_size


class OptionError(ValueError):
    """A configured value cannot be used; the message names the option and
    says what to write. A ValueError, not a TraitError: traitlets turns a
    TraitError met while loading configuration into a bare exit(1), and the
    services print this message and exit with 2 instead."""


def option_name(obj: Any, name: str | None) -> str:
    """``--blob-cache-bytes (c.AgentApp.blob_cache_bytes)``: both ways to set it."""
    name = name or "option"  # a trait's name is set once its class is made
    return f"--{name.replace('_', '-')} (c.{type(obj).__name__}.{name})"


class _Parsed(TraitType[float, float | int | str]):
    """A number read from text with a unit; the default is kept as written for
    ``--generate-config``."""

    def __init__(
        self,
        default_value: str,
        *,
        minimum: float | None = None,
        exclusive: bool = False,
        **kwargs: Any,
    ) -> None:
        self.minimum = minimum
        self.exclusive = exclusive
        self.text_default = default_value
        super().__init__(default_value=self.parse(default_value), **kwargs)

    def parse(self, text: str) -> float:
        raise NotImplementedError

    def validate(self, obj: Any, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise OptionError(
                f"{option_name(obj, self.name)}: expected {self.info_text}, got {value!r}"
            )
        try:
            number = self.parse(value) if isinstance(value, str) else value
        except ValueError as exc:
            raise OptionError(f"{option_name(obj, self.name)}: {exc}") from None
        if self.minimum is not None:
            low = self.minimum
            if number < low or (self.exclusive and number == low):
                bound = "more than" if self.exclusive else "at least"
                raise OptionError(
                    f"{option_name(obj, self.name)}: must be {bound} {self.show(low)}, "
                    f"got {value!r}"
                )
        return number

    def show(self, number: float) -> str:
        return str(number)

    def default_value_repr(self) -> str:
        return repr(self.text_default)


class Duration(_Parsed):
    """Seconds, as a float. Config may say 30, "30s", "2m", "500ms" or "1h";
    "inf", "forever" and "-1" read as -1 (no limit) where `minimum` allows it."""

    info_text = "a duration such as 30s, 2m or 500ms"

    def parse(self, text: str) -> float:
        return parse_duration(text)

    def show(self, number: float) -> str:
        return "zero" if number == 0 else format_duration(number)


class Size(TraitType[int, int | str]):
    """Bytes, as an int. Config may say 1073741824, "1GiB" or "512MB"."""

    info_text = "a size such as 8GiB or 512MB"

    def __init__(self, default_value: str, **kwargs: Any) -> None:
        self.text_default = default_value
        super().__init__(default_value=parse_size(default_value), **kwargs)

    def validate(self, obj: Any, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise OptionError(
                f"{option_name(obj, self.name)}: expected {self.info_text}, got {value!r}"
            )
        try:
            size = parse_size(value) if isinstance(value, str) else value
        except ValueError as exc:
            raise OptionError(f"{option_name(obj, self.name)}: {exc}") from None
        if size <= 0:
            raise OptionError(f"{option_name(obj, self.name)}: must be more than zero")
        return size

    def default_value_repr(self) -> str:
        return repr(self.text_default)


Aliases = dict[str, Any]
Flags = dict[str, tuple[dict[str, dict[str, bool]], str]]


def command_line(cls: type[HasTraits]) -> tuple[Aliases, Flags]:
    """The command line of the options `cls` declares itself (config=True):
    ``--pool-size`` for ``pool_size``; a Bool is a flag, ``--allow-plaintext``
    when it defaults to False, ``--no-zygote`` when it defaults to True. A
    trait tagged ``cli=False`` has only its long form (``--Class.name``)."""
    aliases: Aliases = {}
    flags: Flags = {}
    for name, trait in vars(cls).items():
        if not isinstance(trait, TraitType) or not trait.metadata.get("config"):
            continue
        if trait.metadata.get("cli") is False:
            continue
        option = name.replace("_", "-")
        if isinstance(trait, Bool):
            on = not trait.default_value
            flag = option if on else f"no-{option}"
            text = trait.help.split("\n", 1)[0]
            flags[flag] = ({cls.__name__: {name: on}}, text if on else f"Turn off: {text}")
        else:
            aliases[option] = f"{cls.__name__}.{name}"
    return aliases, flags


class Plugin(Type):  # type: ignore[type-arg]
    """A class picked by configuration: a short name of a built-in (`builtins`)
    or an import path (``mypackage.auth.MyAuthenticator``), which must be a
    subclass of `klass`."""

    def __init__(self, default_value: str, klass: str, builtins: dict[str, str], **kwargs: Any):
        self.builtins = builtins
        super().__init__(
            default_value=builtins.get(default_value, default_value), klass=klass, **kwargs
        )
        self.text_default = default_value

    def validate(self, obj: Any, value: Any) -> Any:
        if isinstance(value, str):
            value = self.builtins.get(value, value)
        try:
            return super().validate(obj, value)
        except TraitError as exc:
            raise OptionError(
                f"{option_name(obj, self.name)}: {value!r} is not usable ({exc}); use one of "
                f"{', '.join(self.builtins)} or the import path of a subclass of {self.klass}"
            ) from None

    def default_value_repr(self) -> str:
        return repr(self.text_default)
