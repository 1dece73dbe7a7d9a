# Sourced by the scripts that run on a lent GPU machine (benchmarks/gpu.sh, training/gpu_sft.sh), from
# the repository root: installs the wheels carried in .whl/ (the packages that machine lacks) and this
# project, then names the GPU. NO_INSTALL=1 skips the install (a rehearsal on a machine that has them).
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${NO_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
