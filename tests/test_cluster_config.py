"""cluster.yaml passes Ray's own cluster-launcher validation and runs the project's setup."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # What `ray up` does before launching: fill the provider's defaults, then validate against
    # Ray's ray-schema.json and its cross-field rules.
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert any("scripts/setup.sh" in cmd for cmd in config["setup_commands"])


def test_cluster_yaml_validation_can_fail():
    import pytest
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_head"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
