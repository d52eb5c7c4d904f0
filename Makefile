# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv with pip (not uv: see DESIGN.md section 9) and are quick once installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast teachers clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fid]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gendistill demo --out samples

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Retrain the shipped teachers (about 15 + 5 minutes on 2 CPU cores) and copy them into the package.
teachers: $(STAMP)
	$(VENV)/bin/gendistill train configs/teacher/digits.yaml output_dir=runs/teacher-digits
	$(VENV)/bin/gendistill train configs/teacher/toy2d.yaml output_dir=runs/teacher-toy2d
	rm -rf gendistill/assets/teachers/digits gendistill/assets/teachers/toy2d
	mkdir -p gendistill/assets/teachers
	cp -r runs/teacher-digits/model gendistill/assets/teachers/digits
	cp -r runs/teacher-toy2d/model gendistill/assets/teachers/toy2d

clean:
	rm -rf runs .pytest_cache
