"""`gpuattach-broker serve` configuration: file, command line, generated default."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuattach_broker.broker.app import BrokerApp


def test_config_file_is_found_and_the_command_line_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gpuattach_broker_config.py").write_text(
        'c.BrokerApp.ttl = "5s"\nc.BrokerApp.address = "127.0.0.1:6000"\n'
        "c.BrokerApp.pool_size = 3\n"
    )
    monkeypatch.chdir(tmp_path)
    options = BrokerApp.configured(["--address", "127.0.0.1:7000"]).options()
    assert options.ttl_seconds == 5.0
    assert options.address == "127.0.0.1:7000"
    assert BrokerApp.configured([]).options().address == "127.0.0.1:6000"
    assert BrokerApp.configured(["--BrokerApp.pool_size=4"]).options().pool_size == 4


def test_explicit_config_file_and_bad_values(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.py"
    config.write_text('c.BrokerApp.idle_exit = "2m"\n')
    assert BrokerApp.configured(["--config", str(config)]).options().idle_exit_seconds == 120.0
    with pytest.raises(ValueError, match="cannot read duration"):
        BrokerApp.configured(["--ttl", "soon"]).options()


def test_generate_config_writes_a_commented_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    BrokerApp.configured(["--generate-config"]).start()
    text = (tmp_path / "gpuattach_broker_config.py").read_text()
    assert "# c.BrokerApp.policy = ''" in text
    assert "TOML policy file" in text
    with pytest.raises(SystemExit):
        BrokerApp.configured(["--generate-config"]).start()  # never overwrites
