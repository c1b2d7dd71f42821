"""Issue 9's attacks on the protocol and the provider, each written as the attack itself.

Glyph code (or a local process) does exactly what an attacker would; each test asserts that the
attack fails, that nothing is lost, and that the provider goes on serving. The sandbox's own
attacks (other glyphs' kernels, /proc, orphans, memory) live with the sandbox.
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from fake_ats import FakeATSStore

from conftest import RPC_TIMEOUT, launch
from kernel_provider.proto import domain_pb2

TOKEN = "first-token"


def glyph(prefix: str = "hard") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def one_sentence(text: str) -> None:
    assert len(text) > 15 and text.rstrip().endswith("."), text
    assert text.count(". ") == 0, f"more than one sentence: {text!r}"


# ------------------------------------------------------------------ a second Initialize (point 2)

# Glyph code that finds nothing but the provider's port (an attacker reads it from /proc/net/tcp)
# and re-Initializes the provider with its own attestation store.
REINITIALIZE_FROM_A_GLYPH = """
import grpc
from kernel_provider.proto import domain_pb2, domain_pb2_grpc
with grpc.insecure_channel("127.0.0.1:{port}") as channel:
    stub = domain_pb2_grpc.DomainPluginServiceStub(channel)
    request = domain_pb2.InitializeRequest(ats_store_endpoint={endpoint!r}, auth_token={token!r},
                                           config={config!r})
    try:
        stub.Initialize(request, timeout=60)
        print("ACCEPTED")
    except grpc.RpcError as exc:
        print(exc.code().name, exc.details())
"""


@pytest.fixture
def stores():
    real, rogue = FakeATSStore(token=TOKEN).start(), FakeATSStore(token=TOKEN).start()
    yield real, rogue
    real.stop()
    rogue.stop()


def initialize(plugin, endpoint: str, token: str, **config: str):
    request = domain_pb2.InitializeRequest(ats_store_endpoint=endpoint, auth_token=token, config=config)
    return plugin.domain.Initialize(request, timeout=RPC_TIMEOUT)


def test_a_glyph_cannot_redirect_attestations_with_a_second_initialize(fresh_provider, stores):
    real, rogue = stores
    plugin = fresh_provider(initialize=False)
    initialize(plugin, real.endpoint, TOKEN)
    attacker, victim = glyph("attacker"), glyph("victim")
    assert plugin.run("secret = 'kept'", victim)["success"]
    for token, config in [("", {}), ("guessed", {}), ("", {"execute_timeout": "1"})]:
        code = REINITIALIZE_FROM_A_GLYPH.format(port=plugin.port, endpoint=rogue.endpoint, token=token, config=config)
        result = plugin.run(code, attacker)
        assert result["success"], result["error"]
        status, _, details = result["stdout"].strip().partition(" ")
        assert status == "PERMISSION_DENIED", result["stdout"]
        one_sentence(details)
    # Every glyph's attest() still reaches the store QNTX named, and nothing else changed.
    made = plugin.run("print(attest(['a'], ['b'], ['c'])['id'])", victim)
    assert made["success"], made["error"]
    assert [c.auth_token for c in real.creates()] == [TOKEN]
    assert not rogue.creates()
    assert plugin.run("secret", victim)["result"] == "'kept'"
    assert plugin.run("import time; time.sleep(1.5); 'slow is fine'", victim)["success"]  # timeout untouched


def test_qntx_may_initialize_again_and_move_the_store_with_its_token(fresh_provider, stores):
    real, other = stores
    plugin = fresh_provider(initialize=False)
    initialize(plugin, real.endpoint, TOKEN)
    initialize(plugin, real.endpoint, TOKEN, execute_timeout="30")  # the same again is fine
    g = glyph()
    assert plugin.run("attest(['a'], ['b'], ['c'])", g)["success"]
    initialize(plugin, other.endpoint, TOKEN)  # the first's token may move the endpoint
    assert plugin.run("attest(['d'], ['e'], ['f'])", g)["success"]
    assert len(real.creates()) == 1 and len(other.creates()) == 1
    # A local process without the token cannot move it back, nor change the token.
    for endpoint, token in [(real.endpoint, ""), (other.endpoint, "another-token")]:
        with pytest.raises(grpc.RpcError) as refused:
            initialize(plugin, endpoint, token)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        one_sentence(refused.value.details())


def test_a_refused_first_initialize_does_not_fix_the_store(fresh_provider, stores):
    real, _ = stores
    plugin = fresh_provider(initialize=False)
    with pytest.raises(grpc.RpcError) as bad:
        initialize(plugin, "127.0.0.1:1", "wrong", execute_timeout="soon")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    initialize(plugin, real.endpoint, TOKEN)
    assert plugin.run("attest(['a'], ['b'], ['c'])", glyph())["success"]
    assert json.loads(plugin.health().details["live_kernels"]) == 1
