# The GPU package layer (playbooks/gpu.yml: cuda_toolkit, docker, nvidia_container_toolkit) on
# a fresh test host against stand-ins of NVIDIA's repositories: `make test-gpu-packages`.
# Included by the Makefile (-include mk/*.mk); uses the provisioning venv of mk/provision.mk.

.PHONY: test-gpu-packages

# $$(PROVISION_STAMP) is expanded after every mk/*.mk is read (mk/provision.mk defines it).
.SECONDEXPANSION:
test-gpu-packages: $$(PROVISION_STAMP) ## GPU roles on a fresh Ubuntu 24.04 host, WSL forced, stand-in NVIDIA repos (needs root)
	STACK_CACHE=$(STACK_CACHE) TESTHOST_CACHE=$(TESTHOST_CACHE) $(ANSIBLE_BIN)/python -m pytest -q -p no:cacheprovider \
	  -W ignore::pytest.PytestConfigWarning tests/provision/test_gpu_packages.py $(PROVISION_PYTEST_ARGS)

TEST_SUITES += test-gpu-packages
