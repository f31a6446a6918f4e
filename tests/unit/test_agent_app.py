"""`gpuattach-agent` configuration: file, command line, generated default."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuattach_broker.agent.cli import AgentApp, main


def test_config_file_is_found_and_the_command_line_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gpuattach_agent_config.py").write_text(
        'c.AgentApp.devices = "cpu:2x4GiB"\nc.AgentApp.pool_size = 3\n'
        'c.AgentApp.broker = "broker.example:50052"\n'
    )
    monkeypatch.chdir(tmp_path)
    app = AgentApp.configured(["--pool-size", "0"])
    assert (app.devices, app.pool_size, app.broker) == ("cpu:2x4GiB", 0, "broker.example:50052")
    assert AgentApp.configured([]).pool_size == 3
    assert AgentApp.configured(["--AgentApp.devices=cpu:1x1GiB"]).devices == "cpu:1x1GiB"


def test_explicit_config_file_and_environment_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUATTACH_BROKER", "10.0.0.5:50051")
    assert AgentApp.configured([]).broker == "10.0.0.5:50051"
    config = tmp_path / "elsewhere.py"
    config.write_text('c.AgentApp.blob_cache_bytes = "2GiB"\n')
    assert AgentApp.configured(["--config", str(config)]).options().cache_bytes == 2 << 30
    with pytest.raises(ValueError, match="--blob-cache-bytes"):
        AgentApp.configured(["--blob-cache-bytes", "plenty"]).options()
    with pytest.raises(ValueError, match="needs both --worker-tls-cert and --worker-tls-key"):
        AgentApp.configured(["--worker-tls-cert", str(config)]).options()
    with pytest.raises(ValueError, match="no such file"):
        AgentApp.configured(
            ["--worker-tls-cert", "/nope.pem", "--worker-tls-key", "/nope.key"]
        ).options()


def test_generate_config_writes_a_commented_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--generate-config"]) == 0
    text = (tmp_path / "gpuattach_agent_config.py").read_text()
    assert "# c.AgentApp.worker_tls_cert = ''" in text
    assert "Warm workers kept ready" in text
    assert main(["--generate-config"]) == 1  # never overwrites


def test_unknown_command_and_bad_values_exit_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["start"]) == 2
    assert "unknown command 'start': use run or check" in capsys.readouterr().err
    assert main(["--mps", "sometimes"]) != 0
    assert main(["--refresh-interval", "0"]) == 2
    assert "must be more than zero" in capsys.readouterr().err
