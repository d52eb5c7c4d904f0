# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv with pip (not uv: see DESIGN.md section 9) and are quick once installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast gpu-check teachers students clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fid]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gendistill demo --out samples

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The GPU paths (bf16, fp16, xformers, torch.compile) and their speed; needs a CUDA GPU.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --out runs/gpu-check.json

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# $(call ship,CONFIG,RUN,ASSET): train configs/CONFIG.yaml into runs/RUN, then copy its model,
# training config and time into gendistill/assets/ASSET (one shell command, for the loops below).
ship = $(VENV)/bin/gendistill train configs/$(1).yaml output_dir=runs/$(2) && \
	rm -rf gendistill/assets/$(3) && mkdir -p $$(dirname gendistill/assets/$(3)) && \
	cp -r runs/$(2)/model gendistill/assets/$(3) && \
	cp runs/$(2)/config.json gendistill/assets/$(3)/training_config.json && \
	cp runs/$(2)/train_time.json gendistill/assets/$(3)/train_time.json

# Retrain the shipped teachers (about 15 + 5 + 35 + 15 + 15 minutes on 2 CPU cores) and copy them
# into the package (digits-vp and digits-flow: the VP epsilon and flow-matching digits teachers).
teachers: $(STAMP)
	for name in digits toy2d synthsounds digits-vp digits-flow; do \
	  $(call ship,teacher/$$name,teacher-$$name,teachers/$$name); \
	done

# Redistil the shipped 1-step CTM students from the shipped teachers (about 20 + 35 + 75-100
# minutes on one CPU thread) and copy them into the package; the digits and sound students'
# single jumps then start where calibrate chooses on the train split (Gaussian, from 3 and 5).
students: $(STAMP)
	for name in toy2d digits synthsounds; do \
	  $(call ship,ctm/$$name,ctm-$$name,students/$$name); \
	done
	$(VENV)/bin/gendistill calibrate gendistill/assets/students/digits --dataset digits \
	  --guidance 1
	$(VENV)/bin/gendistill calibrate gendistill/assets/students/synthsounds \
	  --dataset synthsounds

clean:
	rm -rf runs .pytest_cache
