# Provisioning with Ansible: `make up` (this machine), `make test-provision`, `make lint-ansible`.
# Included by the Makefile (-include mk/*.mk).

ANSIBLE_VENV ?= .venv-ansible
ANSIBLE_BIN := $(ANSIBLE_VENV)/bin
ANSIBLE_PLAYBOOK := $(ANSIBLE_BIN)/ansible-playbook
# Extra ansible-playbook arguments, e.g. ANSIBLE_ARGS="--ask-vault-pass -v".
ANSIBLE_ARGS ?=
# The venv the play installs the stack into (make smoke runs from it after make up).
STACK_VENV ?= /opt/llm-stack/venv
# Caches that survive between runs (CI sets STACK_CACHE): rootfs tarballs, wheelhouse, hosts.
STACK_CACHE ?= $(CURDIR)/.cache
TESTHOST_CACHE ?= $(STACK_CACHE)
PROVISION_PYTEST_ARGS ?=

ANSIBLE_STAMP := $(ANSIBLE_VENV)/.ansible-installed
PROVISION_STAMP := $(ANSIBLE_VENV)/.provision-installed

# The dependency groups of pyproject.toml: `ansible` for `make up`, `provision` (ansible,
# ansible-lint, pytest-testinfra, proxy.py) for the tests. mk/dependency_group.py reads them,
# so an offline `make up` works with the venv's own (older) pip.

.PHONY: up lint-ansible test-provision test-engine

$(ANSIBLE_STAMP): pyproject.toml
	@# A fresh Ubuntu (WSL) lacks python3-venv: ask apt for it first.
	@if ! test -x $(ANSIBLE_BIN)/python && ! $(PYTHON) -c 'import ensurepip' 2>/dev/null; then \
	  echo "python3-venv is missing: installing it with apt (sudo)"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  $$sudo apt-get update -q && $$sudo apt-get install -y -q python3-venv; fi
	@test -x $(ANSIBLE_BIN)/python || $(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_BIN)/python -m pip install -q --upgrade pip
	$(ANSIBLE_BIN)/python mk/dependency_group.py ansible > $(ANSIBLE_VENV)/requirements-ansible.txt
	$(ANSIBLE_BIN)/python -m pip install -q -r $(ANSIBLE_VENV)/requirements-ansible.txt
	@touch $@

$(PROVISION_STAMP): $(ANSIBLE_STAMP) pyproject.toml
	$(ANSIBLE_BIN)/python mk/dependency_group.py provision > $(ANSIBLE_VENV)/requirements-provision.txt
	$(ANSIBLE_BIN)/python -m pip install -q -r $(ANSIBLE_VENV)/requirements-provision.txt
	@touch $@

# With an API key set, export GATEWAY_API_KEY for the final smoke (the play's own smoke
# check already sent it).
up: $(ANSIBLE_STAMP) ## provision this machine (WSL or Ubuntu): playbooks/site.yml, then make smoke
	@# sudo's password when sudo needs one; the vault's when inventory/local holds a vault.yml.
	@ask=; if [ "$$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then ask=--ask-become-pass; fi; \
	  if [ -f inventory/local/group_vars/all/vault.yml ] && [ -z "$${ANSIBLE_VAULT_PASSWORD_FILE:-}" ]; then \
	    ask="$$ask --ask-vault-pass"; fi; \
	  set -x; ANSIBLE_CONFIG=$(CURDIR)/ansible.cfg $(ANSIBLE_PLAYBOOK) -i inventory/local playbooks/site.yml $$ask $(ANSIBLE_ARGS)
	$(MAKE) --no-print-directory smoke VENV=$(STACK_VENV)

lint-ansible: $(PROVISION_STAMP) ## ansible-lint (production profile) + syntax check of every playbook
	cd $(CURDIR) && PATH=$(CURDIR)/$(ANSIBLE_BIN):$$PATH ANSIBLE_CONFIG=$(CURDIR)/ansible.cfg $(ANSIBLE_BIN)/ansible-lint
	@for p in playbooks/*.yml; do \
	  ANSIBLE_CONFIG=$(CURDIR)/ansible.cfg $(ANSIBLE_PLAYBOOK) --syntax-check -i inventory/local $$p >/dev/null || exit 1; \
	  echo "syntax ok: $$p"; done

test-provision: $(PROVISION_STAMP) ## fresh Ubuntu 24.04 hosts (systemd-nspawn): converge, rerun, --check, testinfra (needs root)
	STACK_CACHE=$(STACK_CACHE) TESTHOST_CACHE=$(TESTHOST_CACHE) $(ANSIBLE_BIN)/python -m pytest -q -p no:cacheprovider \
	  -W ignore::pytest.PytestConfigWarning tests/provision/test_provision.py tests/provision/test_gpu_profile.py $(PROVISION_PYTEST_ARGS)

lint: lint-ansible
TEST_SUITES += test-provision

# The TensorRT-LLM engine role (GPU profile) against a stand-in `docker`: command lines,
# manifest-driven rebuilds, check mode. Needs the Ansible venv, not root or a GPU.
test-engine: $(PROVISION_STAMP) setup ## trtllm_engine role with a stand-in docker: build, no-op rerun, rebuild on change
	$(PY) -m pytest -q tests/engine

TEST_SUITES += test-engine
