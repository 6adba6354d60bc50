"""testinfra suite for a host provisioned by playbooks/site.yml.

Run it against the host over SSH, never against this machine:

    pytest tests/infra --hosts=ssh://USER@HOST --ssh-config=FILE --sudo
    pytest tests/infra --hosts=ansible://all --ansible-inventory=INVENTORY --sudo

What the provisioning used (ports, models, paths) comes from a JSON file named by
STACK_INFRA_EXPECT (tests/provision writes one); without it the role defaults are expected.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

pytest.importorskip("testinfra", reason="pytest-testinfra is not installed (pip install .[provision])")

DEFAULTS: dict[str, Any] = {
    "gateway_port": 9000,
    "triton_ports": [8000, 8001, 8002],
    "models": ["smollm2-135m-instruct"],
    "venv": "/opt/llm-stack/venv",
    "install_dir": "/opt/llm-stack",
    "models_dir": "/var/lib/llm-stack/models",
    "triton_service": "llm-triton",
    "triton_user": "triton",
    "gateway_service": "llm-gateway",
    "gateway_user": "llm-gateway",
    "gateway_config_dir": "/etc/llm-gateway",
    "api_key_required": False,
    "model_device": "cpu",
    "model_py_sha256": None,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("hosts", None):
        return
    skip = pytest.mark.skip(
        reason="needs a provisioned host: --hosts=ssh://USER@HOST --sudo (see tests/infra/conftest.py)"
    )
    for item in items:
        if "tests/infra" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def expect() -> dict[str, Any]:
    data = dict(DEFAULTS)
    path = os.environ.get("STACK_INFRA_EXPECT")
    if path:
        with open(path) as fh:
            data.update(json.load(fh))
    return data
