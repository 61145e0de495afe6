"""The config schema names bad keys, and environment overrides land where they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from claas_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    config = load_config({}, environ={})
    assert config.training.teacher == "base" and config.training.alpha == 0.0 and config.training.top_k == 100 and config.lora.rank == 16


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"training\.learning_rat"):
        load_config({"training": {"learning_rat": 1e-4}}, environ={})


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"training\.alpha"):
        load_config({"training": {"alpha": 2.0}}, environ={})
    with pytest.raises(ConfigError, match=r"hindsight_template"):
        load_config({"training": {"hindsight_template": "no placeholder"}}, environ={})


def test_engine_settings_vllm_would_refuse_or_misuse_are_named():
    with pytest.raises(ConfigError, match=r"serving\.max_lora_rank.*16, 32"):  # vLLM's kernels take only some ranks
        load_config({"serving": {"max_lora_rank": 24}}, environ={})
    with pytest.raises(ConfigError, match=r"trainer\.sleep_level.*discards vLLM's weights"):
        load_config({"trainer": {"sleep_level": 2}}, environ={})
    with pytest.raises(ConfigError, match=r"trainer\.sleep_mode"):  # vLLM's default, `abort`, cuts answers off
        load_config({"trainer": {"sleep_mode": "abort"}}, environ={})
    shared = {"trainer": {"colocation": "sleep", "num_gpus": 0.5},
              "serving": {"replica_num_gpus": 0.5, "gpu_memory_utilization": 0.45, "kv_cache_memory_gb": 8}}
    load_config(shared, environ={})
    for key, value, says in (("replica_num_gpus", 0.6, "exceed one GPU"), ("gpu_memory_utilization", 0.55, "share"),
                             ("kv_cache_memory_gb", None, "profiling")):
        with pytest.raises(ConfigError, match=says):
            load_config({**shared, "serving": {**shared["serving"], key: value}}, environ={})
    assert load_config({"serving": {"dtype": "bfloat16"}}, environ={}).serving.lora_wire_dtype() == "bfloat16"
    assert load_config({}, environ={}).serving.lora_wire_dtype() is None  # `auto`: as trained


def test_multi_node_refuses_state_in_one_nodes_files():
    for args, named in (({"multi_node": True}, r"store\.kind: local .* and journal\.kind: sqlite"),
                        ({"multi_node": True, "journal": {"kind": "postgres"}}, r"store\.kind: local"),
                        ({"multi_node": True, "store": {"kind": "s3", "bucket": "b"}}, r"journal\.kind: sqlite")):
        with pytest.raises(ConfigError, match=named):
            load_config(args, environ={})
    cluster = load_config({"multi_node": True, "store": {"kind": "s3", "bucket": "b"}, "journal": {"kind": "postgres"}},
                          environ={})
    assert cluster.node_local_state() == []


def test_custom_resources_pin_each_deployment_and_reach_its_placement_group():
    """A custom resource must be in the replica's one bundle as well as in its actor options, or Ray would never
    place the actor in its own group."""
    from deployments.placement import inference_options, router_options, trainer_options

    config = load_config({"serving": {"replica_resources": {"replica_slot": 1}}, "trainer": {"resources": {"head": 0.5}},
                          "router": {"resources": {"head": 0.25}}}, environ={})
    inference = inference_options(config)
    assert inference["ray_actor_options"]["resources"] == {"replica_slot": 1.0}
    assert inference["placement_group_bundles"] == [{"CPU": 1.0, "replica_slot": 1.0}]
    assert trainer_options(config)["placement_group_bundles"] == [{"CPU": 1.0, "head": 0.5}]
    assert router_options(config)["ray_actor_options"] == {"num_cpus": 0, "resources": {"head": 0.25}}
    assert "resources" not in inference_options(load_config({}, environ={}))["ray_actor_options"]
    for bad, named in (({"CPU": 1}, "not a custom resource"), ({"slot": 0}, "above 0")):
        with pytest.raises(ConfigError, match=rf"serving\.replica_resources.*{named}"):
            load_config({"serving": {"replica_resources": bad}}, environ={})


def test_environment_overrides_yaml():
    config = load_config(
        {"training": {"learning_rate": 1e-5, "teacher": "base"}},
        environ={"CLAAS_RAY__TRAINING__LEARNING_RATE": "3e-4", "CLAAS_RAY__LORA__TARGET_MODULES": "[q_proj, v_proj]"},
    )
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.training.teacher == "base"
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_bad_environment_key_is_named():
    with pytest.raises(ConfigError, match=r"training\.nope"):
        load_config({}, environ={"CLAAS_RAY__TRAINING__NOPE": "1"})


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_serve_config_validates(path):
    (application,) = yaml.safe_load(Path(path).read_text())["applications"]
    assert application["import_path"] == "deployments.app:build_app"
    load_config(application["args"], environ={})


def test_s3_store_needs_a_bucket_and_backends_are_named():
    with pytest.raises(ConfigError, match=r"store.*bucket"):
        load_config({"store": {"kind": "s3"}}, environ={})
    with pytest.raises(ConfigError, match=r"trainer\.backend"):
        load_config({"trainer": {"backend": "sagemaker"}}, environ={})
    config = load_config({"trainer": {"backend": "modal", "modal": {"app_name": "mine"}}}, environ={})
    assert config.trainer.modal.app_name == "mine" and config.trainer.modal.class_name == "SDPOTrainerGPU"


def test_store_kinds_carry_only_their_settings_and_backends_refuse_what_they_ignore():
    assert load_config({"store": {"root": "/tmp/x"}}).store.kind == "local"  # kind may be left out
    for bad, key in [({"store": {"kind": "s3"}}, "store.s3.bucket"), ({"store": {"kind": "local", "bucket": "b"}}, "store.local.bucket"),
                     ({"store": {"kind": "nfs"}}, "store.kind")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(bad)
    tinker = {"serving": {"engine": "tinker"}, "trainer": {"backend": "tinker"}, "store": {"kind": "tinker"}}
    assert load_config(tinker).trainer.backend == "tinker"
    for extra, key in [({"training": {"teacher": "ema"}}, "training.teacher"),
                       ({"training": {"teacher": "snapshot"}}, "training.teacher"),
                       ({"training": {"teacher_rollouts": 2}}, "training.teacher_rollouts"),
                       ({"router": {"request_training": ["alpha"]}}, "router.request_training")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config({**tinker, **extra})
    with pytest.raises(ConfigError, match="trainer.colocation"):
        load_config({"trainer": {"backend": "modal", "colocation": "sleep", "num_gpus": 0.5}, "serving": {"replica_num_gpus": 0.5}})


def test_commands_that_need_no_cluster_do_not_import_ray():
    code = ("import sys, contextlib, io\nfrom claas_ray.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    main(['models', 'list']); main(['keys', 'new', '--tenant', 'x'])\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'deployments'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_cpu_cores_are_cpu_lists_checked_against_the_node():
    config = load_config({"serving": {"cpu_cores": "0"}, "trainer": {"cpu_cores": "0,0-0"}}, environ={})
    assert config.serving.cpu_cores == "0" and config.trainer.cpu_cores == "0,0-0"
    assert config.trainer.step_threads() == 1  # one thread per pinned core
    assert load_config({"trainer": {"cpu_cores": "0-3", "torch_threads": 2}}, environ={}).trainer.step_threads() == 2
    assert load_config({}, environ={}).trainer.step_threads() is None  # Ray's choice
    for bad in ("3-1", "one", "1,", " 1"):
        with pytest.raises(ConfigError, match=r"trainer\.cpu_cores"):
            load_config({"trainer": {"cpu_cores": bad}}, environ={})

    from claas_ray.cpu_cores import available_cores, parse_cpu_list

    assert parse_cpu_list("4-6,0,5") == [0, 4, 5, 6]
    with pytest.raises(ValueError, match=r"serving\.cpu_cores: CPUs \[4096\] are not available"):
        available_cores("0,4096", "serving.cpu_cores")


def test_pinned_process_and_the_threads_it_starts_run_on_its_cores():
    """What the trainer does with `trainer.cpu_cores`, in a process of its own."""
    code = (
        "import os, threading; from claas_ray.cpu_cores import pin_process; seen = []; go = threading.Event()\n"
        "report = lambda: seen.append(str(sorted(os.sched_getaffinity(0))))\n"
        "earlier = threading.Thread(target=lambda: (go.wait(), report())); earlier.start()\n"
        "pin_process([0]); go.set(); earlier.join()\n"
        "later = threading.Thread(target=report); later.start(); later.join(); report(); print(*seen)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["[0]", "[0]", "[0]"], out  # a thread started before, one after, the main thread
