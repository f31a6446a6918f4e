"""What the broker's and the agent's traitlets applications share: finding
their config file the way JupyterHub admins expect, letting the command
line win over it, writing a commented default, and the log level.

A subclass names its file (`config_name`) and declares its own traits;
their ``--name`` aliases and flags are derived from them (options), and
`--config`, `--generate-config` and `--log-level` are added for it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Self

from traitlets import Bool, Enum, Unicode
from traitlets.config import Application

from gpuattach_broker.options import command_line

SEARCH_PATH = ("/etc/gpuattach", str(Path.home() / ".config" / "gpuattach"))


class ServiceApp(Application):
    config_name = "gpuattach_config"  # the file is <config_name>.py

    config_file = Unicode("", help="Load this config file instead of searching.").tag(config=True)
    generate_config = Bool(False, help="Write a commented default config file and exit.").tag(
        config=True
    )
    log_level = Enum(
        (0, 10, 20, 30, 40, 50, "DEBUG", "INFO", "WARN", "WARNING", "ERROR", "CRITICAL"),
        default_value=logging.INFO,
        help="Log level, by value or name.",
    ).tag(config=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give every service --config, --generate-config and --log-level."""
        super().__init_subclass__(**kwargs)
        aliases, flags = command_line(cls)
        cls.aliases = {
            **aliases,
            **cls.aliases,
            "config": f"{cls.__name__}.config_file",
            "log-level": "Application.log_level",
        }
        cls.flags = {
            **flags,
            **cls.flags,
            "generate-config": (
                {cls.__name__: {"generate_config": True}},
                f"Write a commented default {cls.config_name}.py and exit.",
            ),
        }

    @classmethod
    def configured(cls, argv: list[str] | None = None) -> Self:
        """A fresh instance, configured from its file and `argv` (argv wins).

        Not the traitlets singleton (`instance()`): the broker and agent apps
        share a base class, and a singleton of one would block the other."""
        app = cls()
        app.initialize(argv)
        return app

    def config_search_path(self) -> list[str]:
        return [os.getcwd(), *SEARCH_PATH]

    def initialize(self, argv: Any = None) -> None:
        self.parse_command_line(argv)
        cli_config = self.config
        if self.config_file:
            folder, name = os.path.split(os.path.abspath(self.config_file))
            self.load_config_file(name, path=folder)
        else:
            self.load_config_file(self.config_name + ".py", path=self.config_search_path())
        self.update_config(cli_config)  # the command line wins over the file

    def write_default_config(self) -> None:
        """--generate-config: never overwrites an existing file."""
        target = Path(self.config_file or f"{self.config_name}.py")
        if target.exists():
            print(f"{self.name}: {target} exists; not overwriting it", file=sys.stderr)
            self.exit(1)
        target.write_text(self.generate_config_file())
        print(f"wrote {target}")

    def setup_logging(self) -> None:
        level = self.log_level if isinstance(self.log_level, int | str) else logging.INFO
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s", force=True)
