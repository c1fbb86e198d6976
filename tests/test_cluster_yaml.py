"""cluster.yaml checked offline against Ray's own cluster-config schema (no AWS calls).

`prepare_config` / `validate_config` are private Ray APIs: pyproject pins ray==2.60.0 and the
first test fails loudly when the installed Ray differs, so a Ray upgrade re-checks this file.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_VERSION = "2.60.0"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_version_is_the_pinned_one_and_matches_the_image(raw):
    assert ray.__version__ == RAY_VERSION, (
        "private autoscaler API: re-check cluster.yaml for this Ray")
    assert raw["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def test_cluster_yaml_passes_rays_schema(raw):
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["provider"]["type"] == "aws"


def test_schema_check_rejects_a_broken_config(raw):
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["worker.gpu"]["min_wokers"] = 1  # typo: unknown key
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


def test_cpu_head_and_autoscaling_gpu_workers(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for name, t in types.items()
                   if name != raw["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "needs a GPU worker type"
    assert all(t["min_workers"] == 0 < t["max_workers"] <= raw["max_workers"] for t in gpu_workers)


def test_nothing_is_open_to_the_world(raw):
    text = CLUSTER.read_text()
    assert "0.0.0.0" not in text
    # Ray creates a default security group with SSH open to 0.0.0.0/0 for any node type
    # without SecurityGroupIds: every node type must bring its own group.
    for name, node_type in raw["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), name
    assert "IpPermissions" not in raw["provider"].get("security_group", {})
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in " ".join(raw[k]) for k in ("worker_start_ray_commands",))


def test_setup_installs_torch_and_distsim_and_mounts_shared_storage(raw):
    setup = " ".join(raw["setup_commands"])
    assert "torch" in setup and "pip install -q -e ~/distsim" in setup
    assert "~/distsim" in raw["file_mounts"]
    assert any("/mnt/shared" in c for c in raw["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in raw["docker"]["run_options"]
