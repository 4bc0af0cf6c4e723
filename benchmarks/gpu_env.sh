# Source at the start of a GPU device call (bash): the machine is bare and offline, with its own torch / torchvision /
# timm stack, which must not be replaced. Installs the carried wheels of benchmarks/fetch_gpu_wheels.sh (.whl/, named
# in the call's `carry`) into /tmp/site without dependencies and puts them and this checkout on PYTHONPATH, so
# `python -m raddino.cli ...` runs raddino from the working tree against the machine's own torch.
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_env: no wheels in .whl/ (run benchmarks/fetch_gpu_wheels.sh here and carry .whl)" >&2
    return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import raddino, torch, torchvision, timm, omegaconf, webdataset; print('gpu_env: imports ok, torch',
    torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
