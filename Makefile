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

# Retrain the shipped teachers (about 15 + 5 + 35 + 15 + 15 minutes on 2 CPU cores) and copy them
# into the package (digits-vp and digits-flow: the VP epsilon and flow-matching digits teachers).
teachers: $(STAMP)
	for name in digits toy2d synthsounds digits-vp digits-flow; do \
	  $(VENV)/bin/gendistill train configs/teacher/$$name.yaml output_dir=runs/teacher-$$name && \
	  rm -rf gendistill/assets/teachers/$$name && mkdir -p gendistill/assets/teachers && \
	  cp -r runs/teacher-$$name/model gendistill/assets/teachers/$$name && \
	  cp runs/teacher-$$name/config.json gendistill/assets/teachers/$$name/training_config.json && \
	  cp runs/teacher-$$name/train_time.json gendistill/assets/teachers/$$name/train_time.json; \
	done

# Redistil the shipped 1-step CTM students from the shipped teachers (about 12 + 35 + 75-100
# minutes on one CPU thread) and copy them into the package.
students: $(STAMP)
	for name in toy2d digits synthsounds; do \
	  $(VENV)/bin/gendistill train configs/ctm/$$name.yaml output_dir=runs/ctm-$$name && \
	  rm -rf gendistill/assets/students/$$name && mkdir -p gendistill/assets/students && \
	  cp -r runs/ctm-$$name/model gendistill/assets/students/$$name && \
	  cp runs/ctm-$$name/config.json gendistill/assets/students/$$name/training_config.json && \
	  cp runs/ctm-$$name/train_time.json gendistill/assets/students/$$name/train_time.json; \
	done

clean:
	rm -rf runs .pytest_cache
