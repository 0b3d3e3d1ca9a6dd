# Source on the GPU machine (Python 3.12, jax 0.11.2, no network) before a benchmark:
#   source benchmarks/gpu_env.sh
# Installs the wheels carried in .whl/ (ml_collections, jax_triton: the image lacks them) and this
# repository (no deps, no build isolation: nothing is downloaded) under /tmp/site.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --no-cache-dir --upgrade --target /tmp/site . > /tmp/site_install.log 2>&1 \
  || { cat /tmp/site_install.log; false; }
rm -rf build
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
set +e
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
