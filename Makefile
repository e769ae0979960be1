# Two commands on a fresh machine: `make chat` and `make test` (both run `setup` first).
.PHONY: setup chat test runtime clean

VENV := .venv

setup:
	@bash scripts/setup.sh

chat: setup
	$(VENV)/bin/kvq chat

test: setup
	$(VENV)/bin/python -m pytest -q

runtime:
	@python3 scripts/build_runtime.py

clean:
	rm -rf $(VENV) *.egg-info
