# minisora on a CUDA machine: an official PyTorch image (its CUDA build of torch is kept) plus the
# same install steps as `make setup`, straight into the image's Python (no venv needed in a container):
#   1. torch: already installed by the image; pinned with a pip constraint so nothing replaces it
#   2. pip install -e ".[dev]"          (minisora and its dependencies)
#   3. pip install --no-deps colossalai (ColossalAI pins torch<=2.5.1, transformers, diffusers)
#
#   docker build -t minisora .     # or: docker compose build
#   docker run --gpus all --shm-size 16g -v $PWD/data:/data minisora data download dmlab /data/dmlab
#
# The base is the -devel flavour, not -runtime: ColossalAI compiles its fused CUDA/C++ optimizer
# kernels (HybridAdam, which --plugin gemini needs; ddp, zero1 and zero2 step torch's AdamW) with nvcc
# on first use. Without Gemini, `--build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime`
# gives a smaller image.
# torch 2.5.1 is the newest torch colossalai 0.5.0 declares support for.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

ARG COLOSSALAI_VERSION=0.5.0
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/minisora/keep-torch.txt

WORKDIR /opt/minisora

# 1. Keep the image's torch: every later pip call sees this constraint (PIP_CONSTRAINT) and fails
#    loudly instead of silently swapping the CUDA build for another torch.
RUN mkdir -p /etc/minisora \
 && python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /etc/minisora/keep-torch.txt \
 && cat /etc/minisora/keep-torch.txt

# 2a. The dependencies first (read from pyproject.toml), so editing the source does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt ninja

# 2b. minisora itself, editable like `make setup` (data_manifests/ is read from the source tree).
COPY . .
RUN pip install --no-cache-dir -e ".[dev]"

# 3. ColossalAI without its pins, then the same import check as `make setup`, and torch is unchanged.
RUN pip install --no-cache-dir --no-deps "colossalai==${COLOSSALAI_VERSION}" \
 && python -c "import importlib.metadata as m; v = 'torch==' + m.version('torch'); assert v == open('/etc/minisora/keep-torch.txt').read().strip(), v" \
 && python -c "import torch, diffusers, zarr, colossalai; print('minisora env ok: torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && minisora --help > /dev/null

WORKDIR /workspace
ENTRYPOINT ["minisora"]
CMD ["--help"]
