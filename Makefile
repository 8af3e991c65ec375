# pvbess: make help lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
STAMP := $(VENV)/.installed
export CITYLEARN_OFFLINE := 1
export PVBESS_ROOT := $(CURDIR)

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install pvbess (idempotent; quick when nothing changed)

run: install ## The main job: train PPO on the default site (iquitos_mall) for ten simulated years on the twin, evaluate a year in CityLearn, log
	$(BIN)/python -m pvbess.train $(ARGS)

train: install ## Train with Hydra overrides: make train ARGS="agent=sac reward=co2_heavy site=tiny"
	$(BIN)/python -m pvbess.train $(ARGS)

site: install ## Build a site dataset and print its summary: make site ARGS="site=iquitos_mall"
	$(BIN)/python -m pvbess.site $(ARGS)

compare: install ## Compare the site's runs from MLflow: make compare ARGS="site=tiny reward=balanced"
	$(BIN)/python -m pvbess.compare $(ARGS)

SITE ?= iquitos_mall
BUDGET ?= 300000
SAC_BUDGET ?= 50000
RESIDUAL_BUDGET ?= 50000
compare-all: install ## The whole study for SITE on its held-out year: baselines, MPC, optimum, PPO/A2C (BUDGET steps), SAC (SAC_BUDGET) and PPO on the MPC (RESIDUAL_BUDGET) x 3 seeds, compare (verified in CityLearn)
	$(BIN)/python -m pvbess.train --multirun experiment=study_baselines site=$(SITE) $(ARGS)
	$(BIN)/python -m pvbess.train --multirun experiment=study_co2_only site=$(SITE) $(ARGS)
	$(BIN)/python -m pvbess.train --multirun experiment=study_learners site=$(SITE) total_timesteps=$(BUDGET) $(ARGS)
	$(BIN)/python -m pvbess.train --multirun experiment=study_sac site=$(SITE) total_timesteps=$(SAC_BUDGET) $(ARGS)
	$(BIN)/python -m pvbess.train --multirun experiment=study_residual site=$(SITE) total_timesteps=$(RESIDUAL_BUDGET) $(ARGS)
	$(BIN)/python -m pvbess.compare site=$(SITE) verify=true

compare-tuned: install ## The tuned presets (conf/agent/*_tuned.yaml) on the held-out year, 3 seeds, in their own MLflow experiment, then compare
	$(BIN)/python -m pvbess.train --multirun agent=uncontrolled,optimal reward=balanced,cost_heavy env.eval_backend=twin site=$(SITE) tracking.experiment=$(SITE)_tuned $(ARGS)
	$(BIN)/python -m pvbess.train --multirun agent=ppo_tuned,a2c_tuned reward=balanced,cost_heavy seed=0,1,2 env.eval_backend=twin site=$(SITE) total_timesteps=$(BUDGET) tracking.experiment=$(SITE)_tuned $(ARGS)
	$(BIN)/python -m pvbess.train --multirun agent=sac_tuned reward=balanced,cost_heavy seed=0,1,2 env.eval_backend=twin site=$(SITE) total_timesteps=$(SAC_BUDGET) tracking.experiment=$(SITE)_tuned $(ARGS)
	$(BIN)/python -m pvbess.compare site=$(SITE) tracking.experiment=$(SITE)_tuned

ABLATION_BUDGET ?= 100000
ablation: install ## What each learner lever does: PPO, default levers / none / one changed, 3 seeds, reward=balanced, then compare (its own MLflow experiment)
	$(BIN)/python -m pvbess.train --multirun experiment=ablation site=$(SITE) total_timesteps=$(ABLATION_BUDGET) tracking.experiment=$(SITE)_ablation $(ARGS)
	$(BIN)/python -m pvbess.train --multirun agent=uncontrolled,optimal reward=balanced env.eval_backend=twin site=$(SITE) tracking.experiment=$(SITE)_ablation $(ARGS)
	$(BIN)/python -m pvbess.compare site=$(SITE) tracking.experiment=$(SITE)_ablation

mpc-forecasts: install ## What each forecast is worth to the MPC: every mix of perfect, persistence, average and learned PV and load, perfect and persistence EV arrivals, with the uncontrolled site and the optimum, then compare (its own MLflow experiment)
	$(BIN)/python -m pvbess.train --multirun experiment=mpc_forecasts site=$(SITE) tracking.experiment=$(SITE)_mpc_forecasts $(ARGS)
	$(BIN)/python -m pvbess.train --multirun agent=uncontrolled,optimal reward=balanced,cost_heavy env.eval_backend=twin site=$(SITE) tracking.experiment=$(SITE)_mpc_forecasts $(ARGS)
	$(BIN)/python -m pvbess.compare site=$(SITE) tracking.experiment=$(SITE)_mpc_forecasts

sweep: install ## A multirun, jobs in parallel, one MLflow parent run: make sweep ARGS="agent=ppo,sac,a2c seed=0,1,2 site=tiny"
	$(BIN)/python -m pvbess.train --multirun $(ARGS)

tune: install ## Optuna search, best preset to conf/agent/: make tune ARGS="hparams_search=ppo_optuna site=tiny"
	$(BIN)/python -m pvbess.tune $(ARGS)

size: install ## Sizing: CO2 and annual cost per design, Pareto front: make size ARGS="site.bess.capacity_kwh=0,1700,3400 site.pv.ac_kw=1670,3300"
	$(BIN)/python -m pvbess.size $(ARGS)

RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(RAY_STAMP)

install-ray: $(RAY_STAMP) ## Add the Ray launcher (hydra/launcher=ray; downgrades cloudpickle to 2.2.1)

# What CI runs: not the slow tests, nor those that need the ray extra or a browser.
FAST := not slow and not ray and not ui
test: install ## Run the fast test suite (what CI runs)
	$(BIN)/python -m pytest -m "$(FAST)" -q

test-ui: install ## The UI test: the MLflow UI in headless Chromium (installs Debian's chromium and the ui extra)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/pip install -q -e '.[dev,ui]'
	$(BIN)/python -m pytest -m ui -q tests/test_ui.py

test-ray: install-ray ## The Ray tests: a local Ray head (token auth), a sweep and a search on it
	$(BIN)/python -m pytest -m ray -q tests/test_ray.py

test-all: install ## Run every test, the slow ones too (the ray and ui ones skip without their extras)
	$(BIN)/python -m pytest -q

parity: install ## Twin vs. CityLearn over the whole Iquitos year, step by step (the slow parity test)
	$(BIN)/python -m pytest -q -m slow tests/test_twin.py

lint: install ## ruff
	$(BIN)/ruff check pvbess tests

bench: install ## Print speed figures: CityLearn vs. pvbess env steps/s, PPO steps/s
	$(BIN)/python -m pvbess.experiment.bench $(ARGS)

STUDY ?= all
bench-study: install ## Time the README's commands in a temporary root, print a Markdown table: make bench-study STUDY=dataset,run SITE=tiny ARGS="total_timesteps=2000"
	$(BIN)/python -m pvbess.experiment.bench --study $(STUDY) --site $(SITE) $(ARGS)

.PHONY: bench-study ablation compare-tuned mpc-forecasts

PORT ?= 5000
STORE ?= sqlite:///$(PVBESS_ROOT)/mlruns/mlflow.db
ARTIFACTS ?= $(PVBESS_ROOT)/mlruns/artifacts
WORKERS ?= 2
# MLflow 3's UI opens in its GenAI view whatever an experiment's kind; this URL opens the
# "Model training" view (runs table and charts), and the browser keeps the choice.
UI_URL = http://127.0.0.1:$(PORT)/\#/experiments?workflowType=machine_learning
ui: install ## MLflow UI on http://127.0.0.1:5000 (PORT) against the project's store (STORE, ARTIFACTS)
	@echo "pvbess: open $(UI_URL)"
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(PORT) \
	  --backend-store-uri $(STORE) \
	  --default-artifact-root $(ARTIFACTS)

server: install ## MLflow tracking server on 127.0.0.1:PORT (default 5000) for jobs elsewhere: runs in STORE (default: the project's), artifacts proxied to ARTIFACTS
	@echo "pvbess: tracking.uri=http://127.0.0.1:$(PORT); open $(UI_URL)"
	$(BIN)/mlflow server --host 127.0.0.1 --port $(PORT) --workers $(WORKERS) \
	  --backend-store-uri $(STORE) \
	  --serve-artifacts --artifacts-destination $(ARTIFACTS)

clean: ## Remove outputs (experiments/, multirun/, data/ cache); keeps mlruns/ and .venv
	rm -rf experiments multirun data .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help install run train site compare compare-all sweep tune size install-ray parity test test-ray test-ui test-all lint bench ui server clean

RUN ?=
SERVE_PORT ?= 5001
serve: install ## Serve a run's controller over HTTP on 127.0.0.1:PORT (default 5001): make serve RUN=<run id> [PORT=5002] (or MODEL=models:/<site>@champion)
	@test -n "$(RUN)$(MODEL)" || (echo "make serve RUN=<run id> or MODEL=<model uri>"; exit 1)
	MLFLOW_TRACKING_URI=$(STORE) PATH=$(BIN):$$PATH $(BIN)/mlflow models serve \
	  -m $(or $(MODEL),runs:/$(RUN)/controller) --host 127.0.0.1 --port $(if $(filter command line,$(origin PORT)),$(PORT),$(SERVE_PORT)) --env-manager local

bench-serve: install ## Latency of served controllers over HTTP (median, p99 of 1,000 one-row calls): make bench-serve RUNS="<id> <id>"
	PATH=$(BIN):$$PATH $(BIN)/python -m pvbess.experiment.serve_bench --store $(STORE) $(RUNS)

.PHONY: serve bench-serve
