"""Transport security of the broker: TLS for kernels, plaintext only on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuattach_broker.client.broker_client import BrokerAddress, BrokerClient, BrokerError
from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.certs import write_cert
from tests.harness import free_port, wait_for

pytestmark = pytest.mark.integration

BROKER = str(Path(sys.executable).parent / "gpuattach-broker")
AGENT = str(Path(sys.executable).parent / "gpuattach-agent")


def test_broker_speaks_tls_and_refuses_plaintext_off_loopback(tmp_path: Path) -> None:
    ca_key, ca_name = write_cert(tmp_path, "ca", None, None)
    write_cert(tmp_path, "broker", ca_key, ca_name)
    port = free_port()
    log = open(tmp_path / "broker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            BROKER,
            "serve",
            "--address",
            f"127.0.0.1:{port}",
            "--db",
            str(tmp_path / "b.sqlite"),
            "--tls-cert",
            str(tmp_path / "broker.pem"),
            "--tls-key",
            str(tmp_path / "broker.key"),
        ],
        stdout=log,
        stderr=log,
    )
    try:
        secure = BrokerClient(BrokerAddress(f"127.0.0.1:{port}", tls_ca=str(tmp_path / "ca.pem")))
        wait_for(lambda: secure.pool_status() is not None, timeout=30, what="TLS broker")
        plain = BrokerClient(BrokerAddress(f"127.0.0.1:{port}"))
        with pytest.raises(BrokerError, match="cannot reach"):
            plain.pool_status()  # a plaintext client cannot talk to a TLS broker
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()

    refused = subprocess.run(
        [
            BROKER,
            "serve",
            "--address",
            f"0.0.0.0:{free_port()}",
            "--db",
            str(tmp_path / "c.sqlite"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "refusing plaintext" in refused.stderr
    assert "--tls-cert" in refused.stderr


def test_agents_need_a_client_certificate_on_the_agent_port(tmp_path: Path) -> None:
    ca_key, ca_name = write_cert(tmp_path, "ca", None, None)
    write_cert(tmp_path, "broker", ca_key, ca_name)
    write_cert(tmp_path, "agent", ca_key, ca_name)
    port, agent_port = free_port(), free_port()
    env = {**os.environ, "GPUATTACH_BROKER_KEY": "k"}
    env.pop("GPUATTACH_BROKER", None)
    tls = ["--tls-cert", str(tmp_path / "broker.pem"), "--tls-key", str(tmp_path / "broker.key")]
    procs = []
    log = open(tmp_path / "log", "wb")  # noqa: SIM115 - closed below
    try:
        procs.append(
            subprocess.Popen(
                [
                    BROKER,
                    "serve",
                    "--address",
                    f"127.0.0.1:{port}",
                    "--db",
                    str(tmp_path / "b.db"),
                    *tls,
                    "--tls-ca",
                    str(tmp_path / "ca.pem"),
                    "--agent-address",
                    f"127.0.0.1:{agent_port}",
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        client = BrokerClient(
            BrokerAddress(f"127.0.0.1:{port}", key="k", tls_ca=str(tmp_path / "ca.pem"))
        )
        wait_for(lambda: client.pool_status() is not None, timeout=30, what="TLS broker")
        agent = [
            AGENT,
            "--broker",
            f"127.0.0.1:{agent_port}",
            "--devices",
            "cpu:1x1GiB",
            "--pool-size",
            "0",
            "--tls-ca",
            str(tmp_path / "ca.pem"),
        ]
        procs.append(subprocess.Popen(agent, env=env, stdout=log, stderr=log))
        # The agent has really tried: it was turned away twice (its log says so).
        refused = f"lost the broker at 127.0.0.1:{agent_port}"
        wait_for(
            lambda: (tmp_path / "log").read_text(errors="replace").count(refused) >= 2,
            timeout=30,
            what="the agent without a certificate to be refused",
        )
        assert client.pool_status().agents_online == 0, "no client certificate, no agent"
        turned_away = procs.pop()
        turned_away.terminate()
        turned_away.wait(10)
        procs.append(
            subprocess.Popen(
                [
                    *agent,
                    "--tls-cert",
                    str(tmp_path / "agent.pem"),
                    "--tls-key",
                    str(tmp_path / "agent.key"),
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        wait_for(lambda: client.pool_status().agents_online == 1, timeout=30, what="mTLS agent")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        log.close()


def test_workers_serve_tls_that_kernels_verify_with_the_root_from_their_lease(
    tmp_path: Path,
) -> None:
    ca_key, ca_name = write_cert(tmp_path, "ca", None, None)
    for name in ("broker", "agent", "worker"):
        write_cert(tmp_path, name, ca_key, ca_name)
    other_ca_key, other_ca_name = write_cert(tmp_path, "other-ca", None, None)
    port, agent_port = free_port(), free_port()
    env = {**os.environ, "GPUATTACH_BROKER_KEY": "k"}
    env.pop("GPUATTACH_BROKER", None)
    pem = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "broker", "agent", "worker")}
    log = open(tmp_path / "log", "wb")  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            [
                *(BROKER, "serve", "--address", f"127.0.0.1:{port}"),
                *("--db", str(tmp_path / "b.db"), "--tls-ca", pem["ca"]),
                *("--tls-cert", pem["broker"], "--tls-key", str(tmp_path / "broker.key")),
                *("--agent-address", f"127.0.0.1:{agent_port}"),
            ],
            env=env,
            stdout=log,
            stderr=log,
        ),
        subprocess.Popen(
            [
                *(AGENT, "--broker", f"127.0.0.1:{agent_port}", "--devices", "cpu:1x1GiB"),
                *("--tls-ca", pem["ca"], "--tls-cert", pem["agent"]),
                *("--tls-key", str(tmp_path / "agent.key")),
                *("--worker-tls-cert", pem["worker"]),
                *("--worker-tls-key", str(tmp_path / "worker.key")),
                *("--worker-tls-ca", pem["ca"]),
            ],
            env=env,
            stdout=log,
            stderr=log,
        ),
    ]
    try:
        client = BrokerClient(BrokerAddress(f"127.0.0.1:{port}", key="k", tls_ca=pem["ca"]))
        wait_for(lambda: client.pool_status().agents_online == 1, timeout=30, what="mTLS agent")
        lease = client.attach(pb.AttachRequest(user="ada", wait_seconds=-1))
        # the kernel learns whom to trust from its lease, over the broker's TLS channel
        assert lease.worker_tls_root == (tmp_path / "ca.pem").read_bytes()
        worker = WorkerClient(lease.worker_endpoint, lease.token, lease.worker_tls_root)
        outputs: list[pb.ExecuteOutput] = []
        done = worker.execute("print(6 * 7)", 1, outputs.append, lambda request: "")
        assert done.ok
        assert "42" in "".join(o.stream.text for o in outputs)
        worker.close()
        plain = WorkerClient(lease.worker_endpoint, lease.token)  # plaintext to a TLS worker
        with pytest.raises(Exception, match=r"cannot reach|stopped answering|unavailable"):
            plain.hello(pb.HelloRequest())
        plain.close()
        forged = WorkerClient(
            lease.worker_endpoint, lease.token, (tmp_path / "other-ca.pem").read_bytes()
        )  # a worker whose certificate does not chain to the lease's root is not trusted
        with pytest.raises(Exception, match=r"cannot reach|stopped answering|unavailable"):
            forged.hello(pb.HelloRequest())
        forged.close()
        # the admin CLI reaches a TLS broker with --tls-ca
        listing = subprocess.run(
            [BROKER, "leases", "--address", f"127.0.0.1:{port}", "--tls-ca", pem["ca"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing
        assert lease.lease_id in listing.stdout, listing
        client.release(lease)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        log.close()
    del other_ca_key, other_ca_name


def test_agent_refuses_plaintext_workers_off_loopback(tmp_path: Path) -> None:
    refused = subprocess.run(
        [AGENT, "--devices", "cpu:1x1GiB", "--bind", "0.0.0.0", "--broker", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "refusing plaintext workers on 0.0.0.0" in refused.stderr
    assert "--worker-tls-cert" in refused.stderr
