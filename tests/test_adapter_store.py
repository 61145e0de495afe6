"""AdapterStore, on the local filesystem and on S3 (a real moto server): ids, immutable versions, atomic
publish, pointer moves."""

from __future__ import annotations

import json
import os

import pytest
import torch

from claas_ray.adapters import AdapterIdError, AdapterState, LocalAdapterStore, validate_adapter_id
from claas_ray.adapters.s3_store import AdapterStoreCorruptError, S3AdapterStore
from claas_ray.adapters.store import AdapterExistsError, AdapterNotFoundError
from claas_ray.config import LoraConfig


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """Every semantic test runs against both backends."""
    if request.param == "local":
        return LocalAdapterStore(tmp_path)
    server = request.getfixturevalue("s3_server")
    return S3AdapterStore(server.new_bucket(), "tenants/adapters", client=server.client(), cache_dir=tmp_path)


def make_state(value: float = 0.0) -> AdapterState:
    student = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.full((2, 4), 1.0),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.full((4, 2), value),
    }
    return AdapterState(
        lora=LoraConfig(rank=2, alpha=4, target_modules=["q_proj"]),
        base_model="smollm2-135m",
        student=student,
        teacher={k: v.clone() for k, v in student.items()},
        optimizer={"base_model.model.layers.0.q_proj.lora_A.weight::step": torch.tensor(3.0)},
    )


@pytest.mark.parametrize("good", ["alice", "alice/assistant", "a.b-c_d/x.y", "A9"])
def test_valid_ids(good):
    assert validate_adapter_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "..", "a/..", "../etc", "/abs", "a/b/c", "a b", "a/", "/", "x" * 65, "ü", "a\\b", ".", "a/./"]
)
def test_invalid_ids(bad):
    with pytest.raises(AdapterIdError):
        validate_adapter_id(bad)


def test_create_publish_read_back(store):
    meta0 = store.create("alice/assistant", make_state(0.0))
    assert meta0.version == 0 and store.latest_version("alice/assistant") == 0
    meta1 = store.publish("alice/assistant", make_state(1.5), parent_version=0, feedback_ids=["fb-1"], metrics={"loss": 0.25})
    assert meta1.version == 1 and meta1.parent_version == 0
    state, meta = store.load_state("alice/assistant")
    assert meta.version == 1 and meta.feedback_ids == ["fb-1"] and meta.metrics == {"loss": 0.25}
    assert torch.equal(state.student["base_model.model.layers.0.q_proj.lora_B.weight"], torch.full((4, 2), 1.5))
    assert float(state.optimizer["base_model.model.layers.0.q_proj.lora_A.weight::step"]) == 3.0
    old, _ = store.load_state("alice/assistant", 0)
    assert torch.equal(old.student["base_model.model.layers.0.q_proj.lora_B.weight"], torch.zeros(4, 2))
    # The folder is a loadable PEFT adapter.
    folder = store.peft_dir("alice/assistant", 1)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    assert (folder / "adapter_model.safetensors").is_file()
    assert set(store.export_files("alice/assistant")) == {"adapter_config.json", "adapter_model.safetensors"}


def test_create_twice_conflicts_and_versions_are_immutable(store):
    store.create("bob", make_state())
    with pytest.raises(AdapterExistsError):
        store.create("bob", make_state())
    with pytest.raises(AdapterExistsError):
        store._write_version("bob", 0, {"x": b"y"})
    assert store.read_files("bob", 0, ["adapter_config.json"])


def test_namespaces_never_collide(store):
    store.create("alice", make_state(1.0))
    store.create("alice/versions", make_state(2.0))
    store.create("alice/latest", make_state(3.0))
    assert store.list_adapters() == ["alice", "alice/latest", "alice/versions"]
    assert store.list_adapters(prefix="alice/") == ["alice/latest", "alice/versions"]
    state, _ = store.load_state("alice")
    assert float(state.student["base_model.model.layers.0.q_proj.lora_B.weight"][0, 0]) == 1.0


def test_local_interrupted_publish_leaves_nothing_visible(tmp_path, monkeypatch):
    store = LocalAdapterStore(tmp_path)
    store.create("carol", make_state())

    def crash(*args, **kwargs):
        raise OSError("disk gone mid-publish")

    monkeypatch.setattr(os, "rename", crash)  # the commit point of a version
    with pytest.raises(OSError):
        store.publish("carol", make_state(9.0), parent_version=0)
    monkeypatch.undo()
    assert store.version_numbers("carol") == [0]
    assert store.latest_version("carol") == 0
    leftovers = [p for p in (tmp_path / "@" / "carol" / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert store.publish("carol", make_state(9.0), parent_version=0).version == 1


def test_rollback_and_delete(store):
    store.create("dave", make_state(0.0))
    store.publish("dave", make_state(1.0), parent_version=0)
    store.publish("dave", make_state(2.0), parent_version=1)
    store.rollback("dave", 1)
    assert store.latest_version("dave") == 1
    meta = store.publish("dave", make_state(5.0), parent_version=1)
    assert meta.version == 3 and meta.parent_version == 1  # numbers never reused
    with pytest.raises(AdapterNotFoundError):
        store.rollback("dave", 17)
    assert [m.version for m in store.list_versions("dave")] == [0, 1, 2, 3]
    assert store.delete("dave") is True
    assert store.delete("dave") is False
    assert not store.exists("dave") and store.list_adapters() == []
    with pytest.raises(AdapterNotFoundError):
        store.latest_version("dave")


def test_state_files_contain_no_pickles(tmp_path):
    files = make_state().to_files()
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "teacher.safetensors", "optimizer.safetensors"}
    for name, data in files.items():
        assert not data.startswith(b"\x80"), f"{name} looks like a pickle"
    again = AdapterState.from_files(files)
    assert again.lora == make_state().lora


def test_s3_interrupted_publish_leaves_nothing_visible(s3_server, tmp_path):
    """A writer that dies after some objects but before the manifest publishes nothing."""
    client = s3_server.client()
    store = S3AdapterStore(s3_server.new_bucket(), "p", client=client, cache_dir=tmp_path)
    store.create("ns/erin", make_state())
    real_put, puts = client.put_object, []

    def dies_after_two_objects(**kwargs):
        if len(puts) == 2:
            raise ConnectionError("writer died mid-publish")
        puts.append(kwargs["Key"])
        return real_put(**kwargs)

    client.put_object = dies_after_two_objects
    with pytest.raises(ConnectionError):
        store.publish("ns/erin", make_state(9.0), parent_version=0)
    client.put_object = real_put
    assert len(puts) == 2 and all("/versions/1/" in key for key in puts)  # objects of v1 are really there
    # ...but a second process sees no version 1, and `latest` did not move.
    other = S3AdapterStore(store.bucket, "p", client=s3_server.client(), cache_dir=tmp_path / "other")
    assert other.version_numbers("ns/erin") == [0] and other.latest_version("ns/erin") == 0
    with pytest.raises(AdapterNotFoundError):
        other.read_files("ns/erin", 1)
    # The next publish takes number 1 and is whole.
    meta = other.publish("ns/erin", make_state(9.0), parent_version=0)
    state, _ = store.load_state("ns/erin")
    assert meta.version == 1 and float(state.student["base_model.model.layers.0.q_proj.lora_B.weight"][0, 0]) == 9.0


def test_s3_versions_are_immutable_and_verified(s3_server, tmp_path):
    client = s3_server.client()
    store = S3AdapterStore(s3_server.new_bucket(), "", client=client, cache_dir=tmp_path)
    store.create("frank", make_state(1.0))
    with pytest.raises(AdapterExistsError):
        store._write_version("frank", 0, {"x": b"y"})  # the manifest is put only if absent
    # A tampered object is refused, not served.
    manifest = json.loads(client.get_object(Bucket=store.bucket, Key="@/frank/versions/0/manifest.json")["Body"].read())
    client.put_object(Bucket=store.bucket, Key=manifest["files"]["adapter_model.safetensors"]["key"], Body=b"garbage")
    with pytest.raises(AdapterStoreCorruptError, match="does not match its manifest"):
        store.load_state("frank")
    # Objects of another prefix in the same bucket are not adapters of this store.
    client.put_object(Bucket=store.bucket, Key="elsewhere/x/latest", Body=b"0")
    assert S3AdapterStore(store.bucket, "elsewhere2", client=client).list_adapters() == []


def test_s3_store_from_config_and_peft_loads_it(s3_server, tmp_path, trainer):
    """`store.kind: s3` from the config, an initialised adapter published to S3, and PEFT loading its copy."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    from claas_ray.config import ClaasConfig
    from claas_ray.stores import open_store

    bucket = s3_server.new_bucket()
    config = ClaasConfig.model_validate({"store": {
        "kind": "s3", "bucket": bucket, "prefix": "adapters", "endpoint_url": s3_server.endpoint_url,
        "region": "us-east-1", "root": str(tmp_path / "cache"),
    }})
    store = open_store(config.store)
    assert isinstance(store, S3AdapterStore)
    state = trainer.init_adapter(LoraConfig(rank=4, alpha=8), seed=3)
    store.create("gina/chat", state)
    folder = store.peft_dir("gina/chat", 0)
    assert folder.is_relative_to(tmp_path / "cache")
    assert PeftConfig.from_pretrained(str(folder)).r == 4
    loaded = load_peft_weights(str(folder))
    assert loaded.keys() == state.student.keys()
    again, meta = open_store(config.store).load_state("gina/chat")
    assert meta.version == 0 and all(torch.equal(again.student[k], state.student[k]) for k in state.student)
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert all(item["Key"].startswith("adapters/gina/chat/") for item in listed)


def test_s3_racing_writers_cannot_mix_their_objects(s3_server, tmp_path):
    """Two publishers of the same version number: one manifest lands, and its objects are its own."""
    client = s3_server.client()
    first = S3AdapterStore(s3_server.new_bucket(), "race", client=client, cache_dir=tmp_path)
    second = S3AdapterStore(first.bucket, "race", client=s3_server.client(), cache_dir=tmp_path / "b")
    first.create("gus", make_state(0.0))
    real_put = client.put_object

    def second_writer_sneaks_in(**kwargs):
        if kwargs["Key"].endswith("manifest.json") and "/versions/1/" in kwargs["Key"]:
            client.put_object = real_put
            second.publish("gus", make_state(2.0), parent_version=0, version=1)  # lands first
        return real_put(**kwargs)

    client.put_object = second_writer_sneaks_in
    with pytest.raises(AdapterExistsError):
        first.publish("gus", make_state(1.0), parent_version=0, version=1)
    client.put_object = real_put
    state, meta = first.load_state("gus")  # whole and verified: the winner's bytes, not a mix
    assert meta.version == 1 and float(state.student["base_model.model.layers.0.q_proj.lora_B.weight"][0, 0]) == 2.0
