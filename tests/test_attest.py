"""attest() and last() inside glyph kernels, against a real gRPC fake of QNTX's attestation store.

The provider is launched as QNTX launches it, runs real kernels, and reaches the fake store over
real gRPC; the glyph code below is what a person would write in a py glyph.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fake_ats import FakeATSStore
from google.protobuf import json_format

from conftest import RPC_TIMEOUT, Plugin, attached_client, http, launch
from kernel_provider.proto import domain_pb2

TOKEN = "secret-token"


def connect(plugin: Plugin, endpoint: str, token: str = TOKEN) -> None:
    request = domain_pb2.InitializeRequest(ats_store_endpoint=endpoint, auth_token=token)
    plugin.domain.Initialize(request, timeout=RPC_TIMEOUT)


def value_of(plugin: Plugin, glyph_id: str, expression: str):
    """Run ``expression`` in the glyph and return its value, passed through JSON."""
    result = plugin.run(f"import json as _json\nprint(_json.dumps({expression}))", glyph_id)
    assert result["success"], result["error"]
    return json.loads(result["stdout"])


def failure_of(plugin: Plugin, glyph_id: str, code: str) -> str:
    result = plugin.run(code, glyph_id)
    assert not result["success"], result
    return result["error"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store():
    # Two results a page: last() must page through the store to find the newest.
    fake = FakeATSStore(token=TOKEN, max_results=2).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def plugin(store, tmp_path_factory):
    # The first Initialize fixes the store (a later one may not change it without its token).
    plugin = launch(tmp_path_factory.mktemp("attest-conn"), initialize=False)
    connect(plugin, store.endpoint)
    yield plugin
    assert plugin.stop() == 0


@pytest.fixture(scope="module")
def metadata(plugin):
    return plugin.domain.Metadata(domain_pb2.Empty(), timeout=RPC_TIMEOUT)


def test_attest_creates_an_attestation_in_the_store(plugin, store, metadata):
    attributes = {"n": 3, "ratio": 0.25, "nested": {"items": [1, "two", None, True]}, "empty": {}}
    created = value_of(
        plugin,
        "attest-basic",
        f"attest(['alice'], ['knows'], ['work'], attributes={attributes!r})",
    )
    assert created["id"].startswith("AS-")
    assert created["subjects"] == ["alice"] and created["predicates"] == ["knows"]
    assert created["contexts"] == ["work"]
    assert isinstance(created["timestamp"], int) and created["timestamp"] > 0
    assert created["attributes"] == attributes
    assert isinstance(created["attributes"]["n"], int)

    (request,) = [r for r in store.creates() if list(r.command.subjects) == ["alice"]]
    assert request.auth_token == TOKEN
    command = request.command
    assert command.source == metadata.name == "python"
    assert command.source_version == metadata.version
    assert list(command.actors) == ["glyph:attest-basic"]
    assert json_format.MessageToDict(command.attributes) == attributes
    assert not command.HasField("timestamp")
    assert [a.id for a in store.attestations if a.id == created["id"]]


def test_attest_adds_the_callers_actors_after_the_glyph(plugin, store):
    created = value_of(plugin, "attest-actors", "attest(['bob'], ['is'], ['team'], actors=['alice', 'hr'])")
    assert created["actors"] == ["glyph:attest-actors", "alice", "hr"]
    (request,) = [r for r in store.creates() if list(r.command.subjects) == ["bob"]]
    assert list(request.command.actors) == ["glyph:attest-actors", "alice", "hr"]


def test_a_glyph_cannot_attest_as_another_glyph(plugin, store):
    """Issue 9, point 4: the actor comes from whose kernel asked, never from the arguments."""
    before = len(store.creates())
    error = failure_of(plugin, "forger", "attest(['mallory'], ['signed'], ['cheque'], actors=['glyph:victim'])")
    assert error.startswith("AttestationError") and "never name another glyph" in error
    # Nor by going around attest(): the provider checks, not the kernel's own helper.
    code = (
        "import json as _j\n_k = get_ipython().kernel\n"
        "_req = {'method': 'attest',\n"
        "        'params': {'subjects': ['mallory'], 'predicates': ['p'], 'actors': ['glyph:victim']}}\n"
        "print(type(_k).raw_input(_k, '\\x00kernel_provider:' + _j.dumps(_req)))"
    )
    answer = json.loads(plugin.run(code, "forger")["stdout"])
    assert answer["ok"] is False and "never name another glyph" in answer["error"]
    assert len(store.creates()) == before


def test_last_returns_the_newest_match_or_none(plugin, store):
    glyph = "last-glyph"
    ids = value_of(
        plugin,
        glyph,
        "[attest(['carol'], ['step'], ['run'], attributes={'i': i})['id'] for i in range(5)]"
        " + [attest(['dave'], ['step'], ['run'])['id']]",
    )
    newest = value_of(plugin, glyph, "last(subjects=['carol'])")
    assert newest["id"] == ids[4] and newest["attributes"] == {"i": 4}
    assert value_of(plugin, glyph, "last(predicates=['step'], contexts=['run'])")["id"] == ids[5]
    assert value_of(plugin, glyph, "last(actors=['glyph:last-glyph'], subjects=['carol', 'dave'])")["id"] == ids[5]
    assert value_of(plugin, glyph, "last(subjects=['nobody'])") is None
    # The store returned at most two at a time, so finding the 5th carol took several queries.
    carol_queries = [q for q in store.queries() if list(q.filter.subjects) == ["carol"]]
    assert len(carol_queries) >= 3
    assert all(q.auth_token == TOKEN for q in carol_queries)


def test_bad_arguments_raise_in_the_glyph_without_reaching_the_store(plugin, store):
    glyph = "bad-args"
    before = len(store.requests)
    cases = {
        "attest('alice', ['knows'], ['work'])": "TypeError: subjects must be a list of strings, such as ['alice']",
        "attest(['alice'], [1], ['work'])": "TypeError: predicates must hold only strings; 1 is a int",
        "attest([], ['knows'], ['work'])": "ValueError: subjects must name at least one",
        "attest(['a'], ['b'], ['c'], attributes={'s': {1, 2}})": "TypeError: attributes['s'] is a set",
        "attest(['a'], ['b'], ['c'], attributes={1: 'x'})": "TypeError: attributes has the key 1",
        "attest(['a'], ['b'], ['c'], attributes=float('nan'))": "TypeError: attributes must be a dict",
        "attest(['a'], ['b'], ['c'], attributes={'x': float('inf')})": "ValueError: attributes['x'] = inf",
        "attest(['a'], ['b'], ['c'], attributes={'big': 2**60})": "ValueError: attributes['big']",
        "attest(['a'], ['b'], ['c'], attributes={'x': 'y' * 2_000_000})": "ValueError: the request is",
        "last(subjects='carol')": "TypeError: subjects must be a list of strings",
    }
    for code, expected in cases.items():
        error = failure_of(plugin, glyph, code)
        assert expected in error, (code, error)
    assert len(store.requests) == before
    assert value_of(plugin, glyph, "last(subjects=['nobody'])") is None


def test_attest_without_a_glyph_names_a_watcher_as_actor(plugin, store):
    # A run without a glyph id is a QNTX watcher action, run on a runner kernel.
    created = value_of(plugin, "", "attest(['erin'], ['fired'], ['watcher'])")
    assert created["actors"] == ["watcher:python"]
    (request,) = [r for r in store.creates() if list(r.command.subjects) == ["erin"]]
    assert list(request.command.actors) == ["watcher:python"]
    # A watcher run cannot pass itself off as a glyph either.
    error = failure_of(plugin, "", "attest(['erin'], ['fired'], ['watcher'], actors=['glyph:someone'])")
    assert "never name another glyph" in error


def test_a_restarted_kernel_can_still_attest(plugin, store):
    glyph = "attest-restart"
    value_of(plugin, glyph, "attest(['frank'], ['before'], ['crash'])['id']")
    died = plugin.run("import os; os._exit(1)", glyph)
    assert not died["success"] and "KernelDied" in died["error"]
    assert value_of(plugin, glyph, "attest(['frank'], ['after'], ['crash'])['actors']") == [f"glyph:{glyph}"]


def test_the_service_channel_answers_garbage_with_errors_and_carries_on(plugin):
    """Requests that go around attest() get an error answer; the channel and the glyph carry on."""
    glyph = "service-abuse"
    code = """
import json as _json
_k = get_ipython().kernel

def _ask(payload):
    return _json.loads(type(_k).raw_input(_k, "\\x00kernel_provider:" + payload))

print(_json.dumps([_ask("this is not json"), _ask("[1, 2]"), _ask('{"method": "drop", "params": {}}'),
                   _ask("x" * 1_500_000)]))
"""
    result = plugin.run(code, glyph)
    assert result["success"], result["error"]
    answers = json.loads(result["stdout"])
    assert all(a["ok"] is False for a in answers), answers
    assert "not JSON" in answers[0]["error"]
    assert "not a JSON object" in answers[1]["error"]
    assert "unknown method" in answers[2]["error"]
    assert "larger than" in answers[3]["error"]
    assert value_of(plugin, glyph, "attest(['gina'], ['still'], ['works'])['subjects']") == ["gina"]


def test_a_client_attached_to_the_kernel_cannot_attest(plugin, store):
    """Only the provider's own runs reach the store: a person in JupyterLab gets a clear error."""
    glyph = "attached-attest"
    value_of(plugin, glyph, "1")
    entry = next(k for k in http(plugin, "GET", "/kernels")[2]["kernels"] if k["glyph_id"] == glyph)
    before = len(store.creates())
    with attached_client(Path(entry["connection_file"])) as person:
        reply = person.execute_interactive("attest(['x'], ['y'], ['z'])", timeout=30, allow_stdin=False)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "AttestationError"
    assert "not from a client attached" in reply["content"]["evalue"]
    assert len(store.creates()) == before


def test_no_store_configured_raises_and_the_glyph_carries_on(fresh_provider):
    plugin = fresh_provider()  # initialized without an ats_store_endpoint
    glyph = "no-store"
    assert plugin.run("x = 41", glyph)["success"]
    error = failure_of(plugin, glyph, "attest(['a'], ['b'], ['c'])")
    assert error.startswith("AttestationError: no attestation store is configured"), error
    error = failure_of(plugin, glyph, "last(subjects=['a'])")
    assert "AttestationError: no attestation store is configured" in error
    assert value_of(plugin, glyph, "x + 1") == 42
    # The exception can be caught by name in the glyph.
    code = "try:\n    attest(['a'], ['b'], ['c'])\nexcept AttestationError as e:\n    print('caught')"
    assert plugin.run(code, glyph)["stdout"] == "caught\n"


def test_wrong_token_and_refusals_raise_and_the_glyph_carries_on(fresh_provider, tmp_path):
    store = FakeATSStore(token=TOKEN).start()
    try:
        plugin = fresh_provider(initialize=False)
        connect(plugin, store.endpoint, token="not-the-token")
        glyph = "refused"
        assert plugin.run("x = 1", glyph)["success"]
        error = failure_of(plugin, glyph, "attest(['a'], ['b'], ['c'])")
        assert "AttestationError: the attestation store refused the attestation: unauthorized" in error
        error = failure_of(plugin, glyph, "last(subjects=['a'])")
        assert "AttestationError: the attestation store refused the query: unauthorized" in error
        assert store.creates()[0].auth_token == "not-the-token"
        assert not store.attestations

        plugin = fresh_provider(initialize=False)  # QNTX starts the plugin again with the right token
        connect(plugin, store.endpoint)
        assert plugin.run("x = 1", glyph)["success"]
        store.refuse_with = "the database is read-only"
        error = failure_of(plugin, glyph, "attest(['a'], ['b'], ['c'])")
        assert "refused the attestation: the database is read-only" in error
        store.refuse_with = ""
        assert value_of(plugin, glyph, "[x, attest(['a'], ['b'], ['c'])['subjects']]") == [1, ["a"]]
    finally:
        store.stop()


def test_unreachable_store_raises_and_the_glyph_carries_on(fresh_provider):
    plugin = fresh_provider(initialize=False)
    endpoint = f"127.0.0.1:{closed_port()}"
    connect(plugin, endpoint)
    glyph = "unreachable"
    assert plugin.run("x = 'kept'", glyph)["success"]
    error = failure_of(plugin, glyph, "attest(['a'], ['b'], ['c'])")
    assert f"AttestationError: the attestation store at {endpoint} is unreachable" in error, error
    error = failure_of(plugin, glyph, "last()")
    assert "is unreachable" in error
    assert value_of(plugin, glyph, "x") == "kept"
    assert plugin.health().healthy


def test_atsstore_wire_numbers_match_the_qntx_contract():
    from kernel_provider.proto import atsstore_pb2 as ats

    def numbers(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(ats.GenerateAttestationRequest) == {"auth_token": 1, "command": 2}
    assert numbers(ats.AttestationCommand) == {
        "subjects": 1, "predicates": 2, "contexts": 3, "actors": 4, "timestamp": 5,
        "attributes": 6, "source": 7, "source_version": 8,
    }  # fmt: skip
    assert numbers(ats.GenerateAttestationResponse) == {"success": 1, "error": 2, "attestation": 3}
    assert numbers(ats.Attestation) == {
        "id": 1, "subjects": 2, "predicates": 3, "contexts": 4, "actors": 5, "timestamp": 6,
        "source": 7, "attributes": 8, "created_at": 9, "signature": 10, "signer_did": 11,
    }  # fmt: skip
    assert numbers(ats.AttestationFilter) == {
        "subjects": 1, "predicates": 2, "contexts": 3, "actors": 4, "time_start": 5, "time_end": 6,
        "limit": 7,
    }  # fmt: skip
    assert numbers(ats.GetAttestationsRequest) == {"auth_token": 1, "filter": 2}
    assert numbers(ats.GetAttestationsResponse) == {"success": 1, "error": 2, "attestations": 3}
    assert ats.AttestationCommand.DESCRIPTOR.fields_by_name["timestamp"].has_presence
    assert ats.AttestationFilter.DESCRIPTOR.fields_by_name["limit"].has_presence
    service = ats.DESCRIPTOR.services_by_name["ATSStoreService"]
    assert service.full_name == "protocol.ATSStoreService"
    assert [m.name for m in service.methods] == ["GenerateAndCreateAttestation", "GetAttestations"]
